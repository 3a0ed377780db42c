"""Questions about Shapes scenes: categories, answers, prompts and datasets.

The categories mirror the six GQA categories of study B plus the colour question of study A.
Every answer is a single word. Each question can be asked about the image (visual QA, the
``<image>`` placeholder in a LLaVA-1.5 prompt) or about the scene described in words (the
text-only twin, TQA in the sense of study A).

A question is only asked when it is unambiguous: shapes are unique within a scene, left/right
questions need objects that are clearly apart, and binary answers are balanced by drawing the
wanted answer first and then a scene that supports it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hooked_llava.shapes.scene import COLORS, SHAPES, Scene, ShapeObject, render, sample_objects

CATEGORIES: tuple[str, ...] = (
    "Colour",
    "ChooseAttr",
    "ChooseCat",
    "ChooseRel",
    "CompareAttr",
    "LogicalObj",
    "QueryAttr",
)
# Binary categories draw their answer first, so that both answers are equally frequent.
TARGETS: dict[str, tuple[str, str]] = {
    "ChooseRel": ("left", "right"),
    "CompareAttr": ("yes", "no"),
    "LogicalObj": ("yes", "no"),
    "QueryAttr": ("left", "right"),
}
REL_SEPARATION = 12  # ChooseRel: minimum horizontal distance between the two centres, in pixels
SIDE_MARGIN = 10  # QueryAttr: minimum distance of the centre from the vertical midline, in pixels
IMAGE_TOKEN = "<image>"
CAPTION_QUESTION = "Describe the image."
# Study A's colour question and the answer prefix the assistant's turn starts with (the chat
# template in tokenizer.py adds it, so that prompts built from the question alone match).
COLOUR_QUESTION = "What is the color of the {shape}?"
COLOUR_ANSWER_PREFIX = " The color of the {shape} is"


@dataclass(frozen=True)
class Question:
    """A question about a list of objects, before it is put in a prompt."""

    text: str
    answer: str
    mentions: tuple[str, ...]  # the shapes the question names
    options: tuple[str, ...] = ()
    answer_prefix: str = ""  # text the assistant turn starts with, e.g. " The color of the circle is"


@dataclass(frozen=True)
class Example:
    """One question about one scene, with its LLaVA-1.5 prompts and annotations.

    Attributes:
        category: One of ``CATEGORIES``.
        question: The question text.
        answer: The single-word answer.
        prompt: ``"USER: <image>\\n{question}\\nASSISTANT:{answer_prefix}"``.
        text_prompt: The same prompt with the scene description in place of ``<image>``.
        scene: The scene asked about.
        related_bboxes: Bounding boxes of the mentioned objects that exist in the scene.
        options: The option words of a choice question, in question order; else ``()``.
        question_span: ``(start, end)`` character offsets of the question inside ``prompt``.
        text_question_span: The same offsets inside ``text_prompt``.
        answer_prefix: Text the assistant turn starts with ("" except for ``Colour``).
    """

    category: str
    question: str
    answer: str
    prompt: str
    text_prompt: str
    scene: Scene
    related_bboxes: tuple[tuple[int, int, int, int], ...]
    options: tuple[str, ...]
    question_span: tuple[int, int]
    text_question_span: tuple[int, int]
    answer_prefix: str = ""

    @property
    def image(self) -> Image.Image:
        return self.scene.image


def format_prompt(context: str, question: str, answer_prefix: str = "") -> tuple[str, tuple[int, int]]:
    """A LLaVA-1.5 prompt and the character span of the question inside it.

    Args:
        context: ``"<image>"`` for visual QA, or a scene description for text QA.
        question: The question text.
        answer_prefix: Text that starts the assistant's turn.
    """
    head = f"USER: {context}\n"
    prompt = f"{head}{question}\nASSISTANT:{answer_prefix}"
    return prompt, (len(head), len(head) + len(question))


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _ordered(rng: np.random.Generator, true: str, false: str) -> tuple[str, str]:
    return (true, false) if rng.random() < 0.5 else (false, true)


def colour_question(o: ShapeObject) -> Question:
    """Study A's question: "What is the color of the circle?", answered after "The color of the circle is"."""
    text, prefix = COLOUR_QUESTION.format(shape=o.shape), COLOUR_ANSWER_PREFIX.format(shape=o.shape)
    return Question(text, o.color, (o.shape,), (), prefix)


def _colour(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question:
    return colour_question(_pick(rng, objs))


def _choose_attr(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question:
    o = _pick(rng, objs)
    seen = [p.color for p in objs if p.color != o.color]
    false = _pick(rng, seen) if seen and rng.random() < 0.5 else _pick(rng, [c for c in COLORS if c != o.color])
    a, b = _ordered(rng, o.color, false)
    return Question(f"Is the {o.shape} {a} or {b}?", o.color, (o.shape,), (a, b))


def _choose_cat(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question | None:
    unique = [o for o in objs if sum(p.color == o.color for p in objs) == 1]
    if not unique:
        return None
    o = _pick(rng, unique)
    present = [p.shape for p in objs if p is not o]
    absent = [s for s in SHAPES if all(p.shape != s for p in objs)]
    false = _pick(rng, present) if present and rng.random() < 0.5 else _pick(rng, absent)
    a, b = _ordered(rng, o.shape, false)
    mentions = tuple(s for s in (a, b) if s != false or false in present)
    return Question(f"Which shape is {o.color}, the {a} or the {b}?", o.shape, mentions, (a, b))


def _choose_rel(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question | None:
    sign = -1 if target == "left" else 1
    pairs = [(a, b) for a in objs for b in objs if sign * (a.center[0] - b.center[0]) >= REL_SEPARATION]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    first, second = _ordered(rng, "left", "right")
    text = f"Is the {a.shape} to the {first} or to the {second} of the {b.shape}?"
    return Question(text, str(target), (a.shape, b.shape), (first, second))


def _compare_attr(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question | None:
    same = target == "yes"
    pairs = [(a, b) for a in objs for b in objs if a is not b and (a.color == b.color) == same]
    if not pairs:
        return None
    a, b = _pick(rng, pairs)
    return Question(f"Do the {a.shape} and the {b.shape} have the same color?", str(target), (a.shape, b.shape))


def _logical_obj(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question:
    absent = [s for s in SHAPES if all(p.shape != s for p in objs)]
    if target == "yes":  # some named object has another colour than the one excluded
        o = _pick(rng, objs)
        seen = [p.color for p in objs if p.color != o.color]
        color = _pick(rng, seen) if seen and rng.random() < 0.5 else _pick(rng, [c for c in COLORS if c != o.color])
        first, second = o.shape, _pick(rng, [s for s in SHAPES if s != o.shape])
    elif rng.random() < 0.8:  # every named object that exists has the excluded colour
        o = _pick(rng, objs)
        color, first = o.color, o.shape
        same = [p.shape for p in objs if p is not o and p.color == o.color]
        second = _pick(rng, same) if same and rng.random() < 0.5 else _pick(rng, absent)
    else:  # neither named shape is in the scene
        first, second = (absent[k] for k in rng.permutation(len(absent))[:2])
        color = _pick(rng, COLORS)
    s1, s2 = _ordered(rng, first, second)
    mentions = tuple(s for s in (s1, s2) if s not in absent)
    return Question(f"Is there a {s1} or a {s2} that is not {color}?", str(target), mentions)


def _query_attr(objs: list[ShapeObject], rng: np.random.Generator, target: str | None, size: int) -> Question | None:
    sign = -1 if target == "left" else 1
    found = [o for o in objs if sign * (o.center[0] - size / 2) >= SIDE_MARGIN]
    if not found:
        return None
    o = _pick(rng, found)
    return Question(f"On which side of the picture is the {o.shape}?", str(target), (o.shape,))


_ASK: dict[str, Callable[[list[ShapeObject], np.random.Generator, str | None, int], Question | None]] = {
    "Colour": _colour,
    "ChooseAttr": _choose_attr,
    "ChooseCat": _choose_cat,
    "ChooseRel": _choose_rel,
    "CompareAttr": _compare_attr,
    "LogicalObj": _logical_obj,
    "QueryAttr": _query_attr,
}


def ask(
    objects: list[ShapeObject],
    category: str,
    rng: np.random.Generator,
    target: str | None = None,
    image_size: int = 64,
) -> Question | None:
    """Ask a question of a category about some objects, or return None if none is possible.

    Args:
        objects: The scene's objects.
        category: One of ``CATEGORIES``.
        rng: Source of randomness.
        target: For binary categories (``TARGETS``), the answer wanted; drawn from rng if None.
        image_size: Side of the image, in pixels.

    Returns:
        A ``Question`` whose answer is ``target`` for binary categories, or None.
    """
    if category not in _ASK:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if category in TARGETS and target is None:
        target = _pick(rng, TARGETS[category])
    return _ASK[category](objects, rng, target, image_size)


def build_example(scene: Scene, category: str, q: Question) -> Example:
    """Put a question about a scene into its visual and text-only prompts."""
    prompt, span = format_prompt(IMAGE_TOKEN, q.text, q.answer_prefix)
    text_prompt, text_span = format_prompt(scene.describe(), q.text, q.answer_prefix)
    boxes = tuple(o.bbox for o in scene.objects if o.shape in q.mentions)
    return Example(
        category, q.text, q.answer, prompt, text_prompt, scene, boxes, q.options, span, text_span, q.answer_prefix
    )


def sample_example(rng: np.random.Generator, category: str, image_size: int = 64) -> Example:
    """An example of a category drawn from ``rng``: the answer first, then a scene that supports it."""
    if category not in _ASK:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    target = _pick(rng, TARGETS[category]) if category in TARGETS else None
    while True:
        objects = sample_objects(rng, int(rng.integers(1, 4)), image_size)
        q = _ASK[category](objects, rng, target, image_size)
        if q is not None:
            return build_example(Scene(render(rng, objects, image_size), objects), category, q)
