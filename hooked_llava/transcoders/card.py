"""Evaluate a transcoder set on held-out Shapes questions, and write its card (README.md, eval.json).

Metrics (questions of every category from the held-out world `EVAL_SEED`, image and text positions):
per layer, the fraction of the MLP output's variance explained and the mean L0; and the model's answer
accuracy with every MLP replaced by its transcoder (no error terms). For a vision set (the vision MLPs
and the projector) the positions are every vision position of the questions' images (`LayerPairs`).

    python -m hooked_llava.transcoders.card --transcoders hooked_llava/checkpoints/shapes-llava-transcoders
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hooked_llava.shapes.evaluate import EVAL_SEED, answer_scores
from hooked_llava.shapes.questions import CATEGORIES
from hooked_llava.shapes.world import make_dataset
from hooked_llava.transcoders.io import load_transcoders
from hooked_llava.transcoders.splice import mlp_replacement_hooks
from hooked_llava.transcoders.train import LayerPairs
from hooked_llava.transcoders.transcoder import TranscoderSet


@torch.no_grad()
def reconstruction_stats(model: Any, ts: TranscoderSet, examples: Sequence[Any], batch: int = 64) -> dict[str, Any]:
    """Per layer: FVE `1 - Σ‖y - ŷ‖² / Σ‖y - mean y‖²` and mean L0; and the FVE of all layers pooled."""
    source = LayerPairs(model, ts.feature_input_hook, ts.feature_output_hook)
    pairs = torch.cat([source.activations(examples[i : i + batch]) for i in range(0, len(examples), batch)])
    fve, l0, err_sum, var_sum = [], [], 0.0, 0.0
    for layer, tc in enumerate(ts):
        x, y = pairs[:, layer, 0], pairs[:, layer, 1]
        acts = tc.encode(x)
        err = float((y - tc.decode(acts, x)).pow(2).sum())
        var = float((y - y.mean(0)).pow(2).sum())
        fve.append(1 - err / var)
        l0.append(float((acts > 0).float().sum(-1).mean()))
        err_sum, var_sum = err_sum + err, var_sum + var
    return {"n_vectors": len(pairs), "fve": fve, "l0": l0, "fve_overall": 1 - err_sum / var_sum}


def evaluate(model: Any, ts: TranscoderSet, n_per_category: int = 50, seed: int = EVAL_SEED) -> dict[str, Any]:
    """All card metrics on `n_per_category` held-out questions of each category."""
    examples = make_dataset(seed, n_per_category, CATEGORIES)
    result: dict[str, Any] = {"eval_seed": seed, "n_questions": len(examples), "d_transcoder": ts.d_transcoder}
    result.update(reconstruction_stats(model, ts, examples))
    with torch.no_grad():
        result["original"] = answer_scores(model, examples)
        with model.hooks(fwd_hooks=mlp_replacement_hooks(ts)):
            result["replaced"] = answer_scores(model, examples)
    return result


def card(metrics: dict[str, Any], training: dict[str, Any]) -> str:
    """The README of a shipped transcoder set, from `evaluate`'s metrics and the training record."""
    o, r = metrics["original"], metrics["replaced"]
    vision = training.get("tower") == "vision"
    n = len(metrics["fve"])
    names = [f"vision MLP {i}" for i in range(n - 1)] + ["projector"] if vision else [str(i) for i in range(n)]
    rows = "\n".join(
        f"| {name} | {100 * f:.1f} % | {l0:.1f} |" for name, f, l0 in zip(names, metrics["fve"], metrics["l0"])
    )
    if vision:
        what = f"""the {n - 1} vision-tower MLPs and the projector of `{training["model"]}`: layer `i < {n - 1}` reads
`vision.blocks.{{i}}.ln2.hook_normalized` and predicts `vision.blocks.{{i}}.hook_mlp_out` (every vision position,
CLS included); layer {n - 1} reads `projector.hook_in` and predicts `projector.hook_out` (every patch). Stored in
circuit-tracer's format (`config.yaml`, `layer_{{i}}.safetensors`; the hook keys list one hook per layer)."""
        replaced, load = "every vision MLP and the projector replaced", f"{training['model']}-vision"
        drawn = (
            "positions per layer, each layer's own (the vision MLPs': every vision position of the images; "
            "the projector's: every patch)"
        )
        evaluated = "positions per layer, drawn as in training"
    else:
        what = f"""the {n} MLPs of `{training["model"]}`'s language model: each reads
`blocks.{{layer}}.ln2.hook_normalized` and predicts `blocks.{{layer}}.hook_mlp_out`. Stored in circuit-tracer's
format (`config.yaml`, `layer_{{i}}.safetensors`)."""
        replaced, load = "every MLP replaced", training["model"]
        drawn = "image and text positions (each gives every layer's input/output pair)"
        evaluated = "positions"
    return f"""# {training["name"]}

Per-layer transcoders (TopK, k = {training["k"]}, {metrics["d_transcoder"]} features each) for
{what} Load them with

```python
from hooked_llava.transcoders import load_transcoders

ts = load_transcoders("{load}")
```

## Training

`{training["command"]}` — {training["samples"]:,} {drawn},
batches of {training["batch_size"]}, Shapes questions of all categories
(world seed {training["seed"]}), {training["minutes"]:.1f} min wall-clock ({training["cpu_minutes"]:.1f} min of
process CPU time) on a 2-core CPU machine with 1 torch thread.

## Evaluation

On {metrics["n_questions"]} held-out questions (world seed {metrics["eval_seed"]}, all categories,
{metrics["n_vectors"]:,} {evaluated}):

| layer | fraction of variance explained | mean L0 |
|---|---|---|
{rows}
| all (pooled) | {100 * metrics["fve_overall"]:.1f} % | {sum(metrics["l0"]) / len(metrics["l0"]):.1f} |

| visual-QA answers | original | {replaced} (no error terms) |
|---|---|---|
| accuracy | {o["accuracy"]:.1f} % | {r["accuracy"]:.1f} % |
| answer-token loss (nats) | {o["answer_ce"]:.4f} | {r["answer_ce"]:.4f} |

Reproduce with `python -m hooked_llava.transcoders.card --transcoders <this folder>`.
"""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transcoders", required=True, help="folder of the set (config.yaml, layer_*.safetensors)")
    p.add_argument("--n", type=int, default=50, help="questions per category")
    a = p.parse_args(argv)
    from hooked_llava.model.hooked_llava import HookedLlava

    torch.set_num_threads(1)
    folder = Path(a.transcoders)
    ts = load_transcoders(folder)
    training = json.loads((folder / "training.json").read_text())
    model = HookedLlava.from_pretrained(training["model"])
    metrics = evaluate(model, ts, a.n)
    (folder / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / "README.md").write_text(card(metrics, training))
    return metrics


if __name__ == "__main__":
    main()
