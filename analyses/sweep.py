"""Dataset-scale knockout sweeps (study B), resumable, over the Shapes world or a GQA task CSV.

Each example is written to its own file as soon as it is finished (atomically), so a sweep
that is killed and restarted skips what is done and ends with the same table. Like the
study, only examples the model answers correctly are swept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from hooked_llava import HookedLlava
from hooked_llava.geometry import Box

STUDY_B_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\n{question} \n"
    "Answer the question using a single word or phrase. ASSISTANT:"
)
LLAVA15_TEMPLATE = "USER: <image>\n{question}\nASSISTANT:"
DEFAULT_FLOWS = ["question->last", "image->last", "image->question", "last->last"]


@dataclass
class SweepExample:
    """One question about one image; `image` is a PIL image or a zero-argument loader.

    Example:
        >>> prompt = LLAVA15_TEMPLATE.format(question="What is the color of the circle?")
        >>> SweepExample("q1", "Colour", prompt, "red", image, boxes=[(0, 0, 16, 16)]).load_image().size
    """

    id: str
    category: str
    prompt: str
    answer: str
    image: Any
    boxes: list[Box]

    def load_image(self) -> Any:
        return self.image() if callable(self.image) else self.image


def shapes_examples(
    n_per_category: int, seed: int = 777, categories: Iterable[str] | None = None
) -> list[SweepExample]:
    """Generated Shapes-world examples (a seed apart from training), `n_per_category` of each.

    Example:
        >>> [ex.id for ex in shapes_examples(1)][:2]  # ['Colour-0000', 'ChooseAttr-0000']
    """
    from hooked_llava.shapes import CATEGORIES, make_dataset

    examples = make_dataset(seed, n_per_category, tuple(categories or CATEGORIES))
    counters: dict[str, int] = {}
    out = []
    for ex in examples:
        k = counters[ex.category] = counters.get(ex.category, -1) + 1
        boxes = [tuple(float(v) for v in b) for b in ex.related_bboxes]
        out.append(SweepExample(f"{ex.category}-{k:04d}", ex.category, ex.prompt, ex.answer, ex.image, boxes))
    return out


def answer_token(model: HookedLlava, answer: str) -> int:
    """The first token of the answer as it follows the prompt.

    Example:
        >>> answer_token(model, "red") == model.to_single_token("red")
    """
    ids = model.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing.")
    return int(ids[0])


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _one(model: HookedLlava, ex: SweepExample, flows: list[str], window: int, lens: bool) -> dict[str, pd.DataFrame]:
    from .knockout import knockout_sweep
    from .logit_lens import logit_lens, token_ranks

    inputs = model.prepare(images=[ex.load_image()], prompts=[ex.prompt], boxes=[ex.boxes])
    with torch.no_grad():
        predicted = int(model(inputs)[0, inputs.last[0]].argmax())
    target = answer_token(model, ex.answer)
    meta = {
        "id": ex.id,
        "category": ex.category,
        "answer": ex.answer,
        "predicted": model.to_string([predicted]).strip(),
    }
    out = {"examples": pd.DataFrame([{**meta, "correct": predicted == target}])}
    if predicted != target:
        return out
    runs = knockout_sweep(model, inputs, flows, window=window, answer=target, progress=False)
    out["knockout"] = runs.drop(columns="example").assign(id=ex.id, category=ex.category)
    if lens:
        ranks = token_ranks(model, logit_lens(model, inputs), [ex.answer])
        out["lens"] = ranks.assign(id=ex.id, category=ex.category)
    return out


def run_sweep(
    model: HookedLlava,
    examples: Iterable[SweepExample],
    out_dir: str | Path,
    flows: list[str] | None = None,
    window: int = 9,
    lens: bool = False,
    progress: bool = True,
    on_example: Callable[[SweepExample], None] | None = None,
) -> dict[str, pd.DataFrame]:
    """Sweep knockout flows (and optionally the logit lens) over examples, resuming past work.

    Args:
        model: the model.
        examples: `SweepExample`s (e.g. `shapes_examples(50)` or `gqa_examples(csv, images)`).
        out_dir: where per-example results and the tables go; existing results are reused.
        flows: knockout flows (default: question→last, image→last, image→question, last→last).
        window: knockout window (study B: 9).
        lens: also record the answer's logit-lens rank and probability at the last position.
        on_example: called after each newly finished example (progress hooks, tests).

    Returns:
        Tables "examples" (id, category, answer, predicted, correct), "knockout" (the
        `knockout_sweep` columns plus id and category, correct examples only) and "lens".

    Example:
        >>> tables = run_sweep(model, shapes_examples(2), "runs/shapes")  # 2 per category; resumes on rerun
        >>> tables["examples"].groupby("category")["correct"].mean()  # then summarize_knockout(tables["knockout"])
    """
    done_dir = Path(out_dir) / "examples"
    done_dir.mkdir(parents=True, exist_ok=True)
    examples = list(examples)
    for ex in tqdm(examples, desc="sweep", disable=not progress):
        if (done_dir / f"{ex.id}.examples.csv").exists():
            continue
        results = _one(model, ex, flows or DEFAULT_FLOWS, window, lens)
        for name in ("knockout", "lens", "examples"):  # "examples" last: it marks the example done
            if name in results:
                _write_atomic(results[name], done_dir / f"{ex.id}.{name}.csv")
        if on_example is not None:
            on_example(ex)
    return collect(out_dir, [ex.id for ex in examples])


def collect(out_dir: str | Path, ids: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Gather the per-example files of a sweep into tables, in example order.

    Example:
        >>> collect("runs/shapes")["examples"]  # what a sweep has finished so far
    """
    done_dir = Path(out_dir) / "examples"
    ids = ids or sorted(p.name.split(".")[0] for p in done_dir.glob("*.examples.csv"))
    tables = {}
    for name in ("examples", "knockout", "lens"):
        parts = [pd.read_csv(done_dir / f"{i}.{name}.csv") for i in ids if (done_dir / f"{i}.{name}.csv").exists()]
        tables[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return tables


def iter_rows(frame: pd.DataFrame) -> Iterator[tuple[int, pd.Series]]:
    """Rows with their line number in the CSV file (header is line 1).

    Example:
        >>> [line for line, _ in iter_rows(pd.DataFrame({"a": [1, 2]}))]  # [2, 3]
    """
    for i, (_, row) in enumerate(frame.iterrows()):
        yield i + 2, row
