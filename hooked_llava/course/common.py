"""Shared pieces of the course: fresh inputs for the checkers, the colour-swap pair, and result comparison.

The notebooks use `ShapesWorld(seed=0)` and their own scenes; the checkers use the seeds in
`FRESH_SEEDS`, so a function that only works on the notebook's example does not pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from hooked_llava import HookedLlava, LlavaInputs
from hooked_llava.shapes import Scene, ShapesWorld
from hooked_llava.shapes.questions import Example, Question, build_example
from hooked_llava.shapes.scene import make_object, render

FRESH_SEEDS = (101, 202)


def colour_inputs(model: HookedLlava, seed: int, i: int = 0) -> tuple[Example, LlavaInputs]:
    """Colour question `i` of `ShapesWorld(seed)`, prepared with the model's chat template and boxes.

    Example:
        >>> ex, inputs = colour_inputs(model, seed=0)
    """
    ex = ShapesWorld(seed=seed).example(i, "Colour")
    return ex, model.prepare(images=[ex.image], questions=[ex.question], boxes=[list(ex.related_bboxes)])


def fresh_colour_inputs(model: HookedLlava) -> list[tuple[Example, LlavaInputs]]:
    """The checkers' inputs: one colour question per seed of `FRESH_SEEDS` (not the notebooks' seed)."""
    return [colour_inputs(model, seed, i=seed % 7) for seed in FRESH_SEEDS]


def swap_scene(colour: str, seed: int, shape: str = "circle") -> Scene:
    """A `colour` `shape` at a seed-drawn place in the top half, a purple star and an orange square below it.

    The same seed gives the same pixels everywhere except inside the shape, so two colours make a
    clean/corrupted pair for patching.
    """
    rng = np.random.default_rng(seed)
    x0, y0 = (int(v) for v in rng.integers(2, 24, size=2))
    objects = [make_object(shape, colour, 20, x0, y0), make_object("star", "purple", 18, 40, 38),
               make_object("square", "orange", 16, 6, 44)]  # fmt: skip
    objects = sorted(objects, key=lambda o: o.center)
    return Scene(render(np.random.default_rng(seed), objects), objects)


def swap_example(colour: str, seed: int, shape: str = "circle") -> Example:
    """The colour question about `swap_scene(colour, seed, shape)`."""
    scene = swap_scene(colour, seed, shape)
    q = Question(f"What is the color of the {shape}?", colour, (shape,), (), f" The color of the {shape} is")
    return build_example(scene, "Colour", q)


def swap_pair(
    model: HookedLlava, seed: int, colours: tuple[str, str] = ("red", "blue"), shape: str = "circle"
) -> tuple[LlavaInputs, LlavaInputs]:
    """(clean, corrupted) inputs: the same question and positions, the shape's colour swapped.

    Example:
        >>> clean, corrupted = swap_pair(model, seed=11)
    """
    clean_ex, corrupt_ex = (swap_example(c, seed, shape) for c in colours)
    clean = model.prepare(images=[clean_ex.image], questions=[clean_ex.question], boxes=[list(clean_ex.related_bboxes)])
    pixels = model.prepare(images=[corrupt_ex.image], questions=[corrupt_ex.question]).pixel_values
    return clean, clean.with_pixels(pixels)


def _describe(x: Any) -> str:
    return f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"{type(x).__name__} {x!r}"[:80]


def compare(actual: Any, expected: Any, what: str, atol: float = 1e-4, rtol: float = 1e-4) -> None:
    """Raise an AssertionError that says how `actual` differs from `expected` (type, shape, values).

    Tensors are compared with a tolerance; other values (ints, lists, strings) must be equal.

    Example:
        >>> compare(student_result, solution_result, "logit lens at layer 3")
    """
    if not isinstance(expected, Tensor):
        if actual != expected:
            raise AssertionError(f"{what}: got {_describe(actual)}, expected {_describe(expected)}.")
        return
    if not isinstance(actual, Tensor):
        raise AssertionError(f"{what}: expected {_describe(expected)}, got {_describe(actual)}.")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}.")
    if expected.dtype == torch.bool or not (expected.is_floating_point() or actual.is_floating_point()):
        bad = actual.cpu().long() != expected.cpu().long()
    else:
        a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
        bad = ~torch.isclose(a, e, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        a_val, e_val = actual.detach().cpu()[index].item(), expected.detach().cpu()[index].item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} values differ; first at index {index}: "
            f"got {a_val:.6g}, expected {e_val:.6g}."
        )


def passed(name: str) -> None:
    """The message a checker prints when every case passed (as ARENA's checkers do)."""
    print(f"All tests in `{name}` passed!")
