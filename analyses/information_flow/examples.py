"""What a study-B sweep runs on: `SweepExample`s (Shapes-world or read from a GQA CSV), their prompt
templates and answer tokens, and the checks that turn a bad example into an error naming its origin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hooked_llava import HookedLlava
from hooked_llava.inputs.geometry import Box

STUDY_B_TEMPLATE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: <image>\n{question} \n"
    "Answer the question using a single word or phrase. ASSISTANT:"
)
LLAVA15_TEMPLATE = "USER: <image>\n{question}\nASSISTANT:"


class BadExampleError(ValueError):
    """An example could not be swept (unreadable image, answer outside the vocabulary); names its origin."""


@dataclass
class SweepExample:
    """One question about one image; `image` is a PIL image or a zero-argument loader (one with a
    `.path` is keyed by its file's bytes). `origin` says where it came from in errors (file and line).

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
    origin: str = ""

    def load_image(self) -> Any:
        return self.image() if callable(self.image) else self.image


def shapes_examples(
    n_per_category: int, seed: int = 777, categories: Iterable[str] | None = None
) -> list[SweepExample]:
    """Generated Shapes-world examples (a seed apart from training), `n_per_category` of each.
    Ids hold the category, the seed and the index, so two seeds never share an id.

    Example:
        >>> [ex.id for ex in shapes_examples(1)][:2]  # ['Colour-s777-0000', 'ChooseAttr-s777-0000']
    """
    from hooked_llava.shapes import CATEGORIES, make_dataset

    examples = make_dataset(seed, n_per_category, tuple(categories or CATEGORIES))
    counters: dict[str, int] = {}
    out = []
    for ex in examples:
        k = counters[ex.category] = counters.get(ex.category, -1) + 1
        boxes = [tuple(float(v) for v in b) for b in ex.related_bboxes]
        name = f"{ex.category}-s{seed}-{k:04d}"
        out.append(SweepExample(name, ex.category, ex.prompt, ex.answer, ex.image, boxes, f"Shapes seed {seed}"))
    return out


def answer_token(model: HookedLlava, answer: str) -> int:
    """The first token of the answer as it follows the prompt; an answer the tokenizer does not know
    (its first token is `<unk>`) is an error, not a silent `<unk>`.

    Example:
        >>> answer_token(model, "red") == model.to_single_token("red")
        True
    """
    tokenizer = model.tokenizer
    ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing.")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and answer.strip() != tokenizer.unk_token:
        raise ValueError(
            f"answer {answer!r} is not in the tokenizer's vocabulary (it tokenises to {tokenizer.unk_token})."
        )
    return int(ids[0])


def _guarded(what: str, ex: SweepExample, read: Callable[[], Any]) -> Any:
    """`read()`, with a file that cannot be read turned into a `BadExampleError` naming the example's origin."""
    try:
        return read()
    except (OSError, ValueError, SyntaxError) as err:  # PIL raises these for missing, corrupt or truncated files
        raise BadExampleError(f"{ex.origin or ex.id}: the image could not be read for its {what} ({err}).") from err


MAX_ID = 150  # characters: the id names files "{id}.knockout.csv" (255 bytes at most on common file systems)


def id_problem(ex_id: Any) -> str:
    """Why `ex_id` cannot name an example's files ("" when it can): empty, a path separator, a control
    character, a leading dot or space (hidden files, temporary files), or too long.

    Example:
        >>> id_problem("ChooseAttr-201307251"), id_problem("a/b")
        ('', "it holds '/'")
    """
    if not isinstance(ex_id, str) or not ex_id.strip():
        return "it is empty"
    bad = next((c for c in ex_id if c in "/\\" or ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        return f"it holds {bad!r}"
    if ex_id[0] in ". " or ex_id[-1] == " ":
        return "it starts with a dot or a space, or ends with a space"
    if len(ex_id.encode()) > MAX_ID:
        return f"it is longer than {MAX_ID} bytes"
    return ""


def _check_ids(examples: list[SweepExample]) -> None:
    seen: dict[str, list[str]] = {}
    for ex in examples:
        seen.setdefault(ex.id, []).append(ex.origin or "?")
    dup = {i: where for i, where in seen.items() if len(where) > 1}
    if dup:
        raise ValueError(f"duplicate example ids (each id must name one example): {dup}.")


def iter_rows(frame: pd.DataFrame) -> Iterator[tuple[int, pd.Series]]:
    """Rows with their line number in the CSV file (header is line 1).

    Example:
        >>> [line for line, _ in iter_rows(pd.DataFrame({"a": [1, 2]}))]  # [2, 3]
    """
    for i, (_, row) in enumerate(frame.iterrows()):
        yield i + 2, row
