"""Checks and inputs of the `hooked-llava` command line.

Every user mistake becomes a `UsageError`, which the CLI prints as one line with exit status 2.
Arguments that need no model (image, output folder, flows, scene) are checked before it loads.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path
from typing import Any

# The default scene of `explain` (seed, category, index), found by searching Shapes worlds: three
# objects (a cross among them), a Colour question about the star answered right but not saturated
# (p = 0.82), a knockout effect of 0.22 nats, and study A's patch map ranking a patch of the star
# first (tests/test_cli.py checks all three).
DEFAULT_SCENE = (44, "Colour", 13)


class UsageError(Exception):
    """A mistake in the command line: reported in one line, exit status 2."""


def check_image(path: str) -> Any:
    """The image at `path`, unconverted (`prepare` scales 16-bit, float and paletted images, as for any
    image), or a `UsageError` saying why it cannot be read or scaled."""
    from PIL import UnidentifiedImageError

    from hooked_llava.inputs.images import open_image, to_byte_range

    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--image {path}: no such file.")
    try:
        image = open_image(file)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UsageError(f"--image {path}: not an image PIL can read ({type(err).__name__}).") from err
    try:
        to_byte_range(image)  # what prepare will do: an image it cannot scale is refused before the model loads
    except ValueError as err:
        raise UsageError(f"--image {path}: {err}") from err
    return image


def check_out(out: str, what: str = "the report") -> bool:
    """Make sure the output folder can be written; True when it already holds a report."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: give a folder for {what}.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".hooked-llava-write-check."):
            pass  # a name of its own: two runs checking one folder at once do not remove each other's probe
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write there ({err.strerror or err}); choose another folder.") from err
    return (path / "report.html").exists()


def check_flows(text: str) -> list[str]:
    """Comma-separated flow names, each `source->target` with known roles."""
    from analyses.information_flow.flows import _ROLE_ALIASES, FLOWS
    from hooked_llava.inputs.llava_inputs import ROLES

    flows = [f.strip() for f in text.split(",") if f.strip()]
    for flow in flows:
        parts = flow.lower().replace("→", "->").replace(" ", "").split("->")
        roles = [_ROLE_ALIASES.get(p, p) for p in parts]
        if len(parts) != 2 or not all(r in ROLES for r in roles):
            raise UsageError(
                f"--flows: unknown flow {flow!r}; use source->target with roles from {', '.join(ROLES)} "
                f"(e.g. {', '.join(FLOWS)})."
            )
    if not flows:
        raise UsageError("--flows is empty: give comma-separated flows such as question->last,image->last.")
    return flows


def scene(spec: tuple[int, str, int]) -> Any:
    """The Shapes example `(seed, category, index)`, checked."""
    from hooked_llava.shapes import ShapesWorld
    from hooked_llava.shapes.questions import CATEGORIES

    seed, category, index = spec
    known = {c.lower(): c for c in CATEGORIES}
    if category.lower() not in known:
        raise UsageError(f"--category {category!r} is not a Shapes category; use one of {', '.join(CATEGORIES)}.")
    if seed < 0 or index < 0:
        raise UsageError(f"--seed and --index must be >= 0; got {seed} and {index}.")
    return ShapesWorld(seed).example(index, known[category.lower()])


def load_model(name: str) -> Any:
    """Load a model, turning a bad name or folder into a one-line `UsageError` (an unknown name fails in
    `resolve`, before any weights are read or the hub is asked)."""
    from hooked_llava.loading.resolve import looks_like_path
    from hooked_llava.model.hooked_llava import HookedLlava

    try:
        return HookedLlava.from_pretrained(name)
    except FileNotFoundError as err:
        if not looks_like_path(name):
            raise UsageError(f"--model {name!r}: unknown model: {_first_line(err)}") from err
        raise UsageError(f"--model {name!r}: could not load it: {_first_line(err)}") from err
    except (OSError, ValueError) as err:  # CheckpointError and friends
        raise UsageError(f"--model {name!r}: could not load it: {_first_line(err)}") from err


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _mentioned_boxes(example: Any, question: str) -> list:
    words = set(re.findall(r"[a-z]+", question.lower()))
    return [o.bbox for o in example.scene.objects if o.shape in words]


def build_inputs(model: Any, args: argparse.Namespace, example: Any, image: Any) -> Any:
    """The prepared example: the default scene and question, or the user's image/question/prompt."""
    question, prompt = getattr(args, "question", None), getattr(args, "prompt", None)
    if model.vision is None:
        if image is not None:
            raise UsageError("--image: this model reads no images (it is text-only); leave --image out.")
        return _text_inputs(model, example, question, prompt)
    boxes = None if image is not None else [list(example.related_bboxes)]
    if image is None and question is not None:
        boxes = [_mentioned_boxes(example, question)]
    image = example.image if image is None else image
    try:
        if prompt is not None:
            inputs = model.prepare(images=[image], prompts=[prompt], boxes=None if question is None else boxes)
        elif question is not None:
            inputs = model.prepare(images=[image], questions=[question], boxes=boxes)
        else:
            inputs = model.prepare(images=[image], prompts=[example.prompt], boxes=boxes)
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from err
    return inputs


def _text_inputs(model: Any, example: Any, question: str | None, prompt: str | None) -> Any:
    """Inputs for a text-only model: the scene described in words in place of the image."""
    if prompt is not None:
        text = prompt
    elif question is not None:
        text = _text_prompt(model.tokenizer, example.scene.describe(), question)
    else:
        text = example.text_prompt
    try:
        return model.prepare(prompts=[text])  # the question is the last line of the user's turn
    except ValueError as err:
        raise UsageError(str(err).splitlines()[0]) from err


def _text_prompt(tokenizer: Any, context: str, question: str) -> str:
    """The scene description and the question in the model's own chat template (its answer format)."""
    if getattr(tokenizer, "chat_template", None):
        content = [{"type": "text", "text": context}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"USER: {context}\n{question}\nASSISTANT:"
