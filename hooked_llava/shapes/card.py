"""Model cards (README.md) of the two Shapes checkpoints, filled in from training and evaluation.

``python -m hooked_llava.shapes.card --llava DIR --lm DIR`` evaluates the checkpoints on fresh
held-out questions and writes both cards; the training time comes from each directory's
``training.json``, written by the training script.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from hooked_llava.shapes.evaluate import EVAL_SEED, evaluate_checkpoints, format_table

_FRONT = """---
library_name: transformers
license: mit
pipeline_tag: {pipeline}
tags: [toy-model, interpretability, llava, shapes]
---
"""

_DATA = """## Data: the Shapes world

`hooked_llava.shapes.ShapesWorld(seed)` draws 64×64 RGB scenes (8×8 patches of 8 px) with one
to three non-overlapping objects on a lightly textured background. Each object has one of six
shapes (circle, square, triangle, star, cross, diamond; unique within a scene), one of six
colours (red, green, blue, yellow, purple, orange), a size of 16–24 px and a position, and
records its bounding box. Scenes are rasterised with numpy masks from seeded generators, so
they are byte-identical on every run.

Questions (every answer is one word; binary answers and option order are balanced):

| category | example | answers |
|---|---|---|
| Colour (study A) | What is the color of the circle? → *The color of the circle is* | a colour |
| ChooseAttr | Is the circle red or blue? | a colour |
| ChooseCat | Which shape is red, the circle or the square? | a shape |
| ChooseRel | Is the circle to the left or to the right of the square? | left / right |
| CompareAttr | Do the circle and the square have the same color? | yes / no |
| LogicalObj | Is there a circle or a star that is not red? | yes / no |
| QueryAttr | On which side of the picture is the circle? | left / right |

Prompts use LLaVA-1.5's format, `USER: <image>\\n{{question}}\\nASSISTANT:`. In the text-only twin
(TQA), the scene's description replaces `<image>`, e.g. *There is a red circle on the left and
a blue square on the right.* Objects are described left to right.
"""


def _clip_data(r: dict) -> str:
    what = "contrastive, scenes ↔ captions"
    if r.get("region_weight"):
        what += f", plus {r['region_weight']:g} × objects' patches ↔ object phrases (layer -2)"
    return what + "; only the vision tower is kept"


def _recipe(summary: dict) -> str:
    r, s = summary["recipe"], summary["seconds"]
    rows = [
        ("1. CLIP", _clip_data(r), "clip", "1_clip"),
        ("2. base LM", "descriptions + text-only QA (7 categories) + text captions", "lm", "2_lm"),
        ("3. alignment", "projector only, on captioning; vision tower and LM frozen", "align", "3_align"),
        ("4. instruction tuning", "projector + LM on visual QA, plus text-only QA; vision frozen", "tune", "4_tune"),
    ]
    lines = ["| stage | data and trainable parts | steps × batch | lr | time |", "|---|---|---|---|---|"]
    for name, what, key, t in rows:
        st = r[key]
        lines.append(f"| {name} | {what} | {st['steps']} × {st['batch']} | {st['lr']:g} | {s[t] / 60:.1f} min |")
        if key == "clip" and r.get("bind", {}).get("steps"):
            b, n = r["bind"], summary.get("bind_steps", r["bind"]["steps"])
            what = "associative recall, `<s> red circle blue square square` → blue"
            what += f", until {r['bind_until']:.0%} accuracy"
            lines.append(f"| 2a. recall warm-up | {what} | {n} × {b['batch']} | {b['lr']:g} | in stage 2 |")
    cpu = summary.get("cpu_seconds")
    cpu_note = f" (process CPU time {cpu / 60:.0f} min)" if cpu else ""
    if summary.get("stage2_reused"):
        cpu_note = (
            f" (process CPU time {cpu / 60:.0f} min for stages 1, 3 and 4). Stage 2 was taken from an earlier "
            "run of the same command with identical stage-2 settings (`--reuse-lm`); its measured time is included"
        )
    return (
        "## Training recipe (LLaVA's, in miniature)\n\n"
        + "\n".join(lines)
        + f"\n\nTotal training time: **{s['total'] / 60:.1f} min** of wall-clock time on a 2-core CPU machine with "
        f"{summary['threads']} torch threads, seed {summary['seed']}{cpu_note}. Retrain with\n\n"
        f"```\npython -m hooked_llava.shapes.train --out DIR --seed {summary['seed']}\n```\n\n"
        "The loss is on answer, description and caption tokens only. One sequence packs several "
        "questions about the same scene after a shared `USER: <image>\\n` prefix; a 4D attention "
        "mask and restarted position ids make each branch compute exactly what its single-question "
        "prompt would.\n"
    )


def _evaluation(table: pd.DataFrame, n: int, seed: int) -> str:
    return (
        "## Evaluation\n\n"
        f"Accuracy (%) of the arg-max next token on {n} fresh questions per category from a held-out "
        f"world (seed {seed}; training used seeds 1000·seed + stage):\n\n"
        + format_table(table)
        + f"\nReproduce with `python -m hooked_llava.shapes.evaluate --n {n}`.\n"
    )


def _status(table: pd.DataFrame) -> str:
    """A warning when the visual-QA accuracy is below the targets (95% per category, 98% overall)."""
    visual = table["llava_visual"]
    if visual.drop("overall").min() >= 95.0 and visual["overall"] >= 98.0:
        return ""
    return (
        "\n**Status: an interim checkpoint.** Its visual-QA accuracy "
        f"({visual['overall']:.1f}% overall, {visual.drop('overall').min():.1f}% in the weakest category) "
        "is below the targets of 95% per category and 98% overall. The analyses run on it, but "
        "read findings about the image pathway with that in mind.\n"
    )


def _sizes(path: Path) -> str:
    from safetensors.torch import load_file

    n = sum(t.numel() for t in load_file(path / "model.safetensors").values())
    mb = (path / "model.safetensors").stat().st_size / 1e6
    return f"{n / 1e6:.2f} M parameters, {mb:.1f} MB in fp32 safetensors"


def llava_card(path: Path, table: pd.DataFrame, n: int, seed: int, summary: dict) -> str:
    """The README of ``shapes-llava``."""
    return (
        _FRONT.format(pipeline="image-text-to-text")
        + "\n# shapes-llava\n\nA tiny LLaVA-1.5 trained from scratch on the synthetic Shapes world, shipped "
        "with `hooked_llava` so that interpretability analyses (study A's log-probability increase, "
        "study B's attention knockout) can be run and tested on a laptop CPU in seconds.\n\n"
        "## Model\n\n"
        f"`LlavaForConditionalGeneration`, {_sizes(path)}.\n\n"
        "- Vision tower: CLIP ViT, 64 px, patch 8 (8×8 grid + CLS), 4 layers, width 128, 4 heads, quick_gelu.\n"
        "- Image features: hidden state of vision layer −2, CLS dropped (`default` strategy): 64 image tokens.\n"
        "- Projector: Linear(128→128) → GELU → Linear(128→128).\n"
        "- Language model: Llama, 8 layers, width 128, 8 heads of 16, SiLU MLP of 384, RMSNorm, RoPE, "
        "untied embeddings; initialised from `shapes-lm`.\n"
        "- Tokenizer: word level, 58 tokens (`<unk>`, `<s>`, `</s>`, `<pad>`, `<image>`, punctuation, "
        "newline, words), so every answer is one token. The processor expands `<image>` into 64 tokens.\n\n"
        + _DATA
        + "\n"
        + _recipe(summary)
        + "\n"
        + _evaluation(table, n, seed)
        + _status(table)
        + "\n## Usage\n\n```python\nfrom transformers import AutoProcessor, LlavaForConditionalGeneration\n"
        "from hooked_llava.shapes import ShapesWorld, checkpoint_path\n\n"
        'path = checkpoint_path("shapes-llava")\n'
        "model = LlavaForConditionalGeneration.from_pretrained(path)\n"
        "processor = AutoProcessor.from_pretrained(path)\n"
        'ex = ShapesWorld(seed=12345).example(0, "ChooseRel")\n'
        'inputs = processor(images=ex.image, text=ex.prompt, return_tensors="pt")\n'
        "answer = processor.tokenizer.convert_ids_to_tokens(int(model(**inputs).logits[0, -1].argmax()))\n"
        '```\n\nWith hooks: `HookedLlava.from_pretrained("shapes-llava")`.\n\n'
        "## Intended use and limitations\n\n"
        "For teaching, testing and developing interpretability methods on a model small enough to "
        "train, run and inspect on a CPU. It knows only the Shapes world: 58 words, 64×64 images, "
        "seven question templates. It is not a general vision-language model, and findings on it "
        "are hypotheses to check on real LLaVA checkpoints, not evidence about them.\n"
    )


def lm_card(path: Path, table: pd.DataFrame, n: int, seed: int, summary: dict) -> str:
    """The README of ``shapes-lm``."""
    return (
        _FRONT.format(pipeline="text-generation")
        + "\n# shapes-lm\n\nThe base language model of `shapes-llava`: a tiny Llama trained from scratch "
        "(stage 2 of the recipe) on descriptions of Shapes scenes and text-only questions about "
        "them. `shapes-llava`'s language model was initialised from it, which makes the pair "
        "suitable for study A's comparison of base-LM text QA with LLaVA text and visual QA.\n\n"
        f"## Model\n\n`LlamaForCausalLM`, {_sizes(path)}: 8 layers, width 128, 8 heads of 16, SiLU MLP "
        "of 384, RMSNorm, RoPE, untied embeddings, 58-token word-level vocabulary.\n\n"
        + _DATA
        + "\n"
        + _recipe(summary)
        + "\nThis model is the output of stage 2.\n\n"
        + _evaluation(table, n, seed)
        + "\n## Intended use and limitations\n\nAs for `shapes-llava`: a toy for interpretability "
        "work. It only knows the Shapes vocabulary and prompt format.\n"
    )


def write_cards(llava_dir: str | Path, lm_dir: str | Path, n: int = 500, seed: int = EVAL_SEED) -> pd.DataFrame:
    """Evaluate both checkpoints and write their README.md model cards (and ``eval.json``)."""
    llava_dir, lm_dir = Path(llava_dir), Path(lm_dir)
    table = evaluate_checkpoints(llava_dir, lm_dir, seed, n)
    summary = json.loads((llava_dir / "training.json").read_text())
    (llava_dir / "README.md").write_text(llava_card(llava_dir, table, n, seed, summary))
    (lm_dir / "README.md").write_text(lm_card(lm_dir, table, n, seed, summary))
    record = {"seed": seed, "n_per_category": n, "accuracy": table.round(2).to_dict(orient="index")}
    for d in (llava_dir, lm_dir):
        (d / "eval.json").write_text(json.dumps(record, indent=1) + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> None:
    from hooked_llava.shapes import checkpoint_path

    parser = argparse.ArgumentParser(description="Evaluate the Shapes checkpoints and write their model cards.")
    parser.add_argument("--llava", default=str(checkpoint_path("shapes-llava")))
    parser.add_argument("--lm", default=str(checkpoint_path("shapes-lm")))
    parser.add_argument("--n", type=int, default=500, help="questions per category")
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    args = parser.parse_args(argv)
    print(format_table(write_cards(args.llava, args.lm, args.n, args.seed)))


if __name__ == "__main__":
    main()
