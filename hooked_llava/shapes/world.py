"""The Shapes world: a seeded generator of scenes and question-answer examples.

Everything is a deterministic function of a seed: randomness comes from
``numpy.random.default_rng`` seeded with ``(seed, index, stream)``. Scenes are drawn by
``hooked_llava.shapes.scene``; questions are asked by ``hooked_llava.shapes.questions``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hooked_llava.shapes.questions import CATEGORIES, Example, sample_example
from hooked_llava.shapes.scene import MAX_SIZE, Scene, render, sample_objects, shape_mask


class ShapesWorld:
    """A seeded generator of scenes and question-answer examples.

    Args:
        seed: Seed of the world; scene ``i`` of world ``seed`` is always the same.
        image_size: Side of the square images, in pixels.
        patch_size: Side of a vision patch, in pixels (the patch grid is image_size / patch_size).
    """

    def __init__(self, seed: int = 0, image_size: int = 64, patch_size: int = 8):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if image_size < 2 * MAX_SIZE + 4:
            raise ValueError(f"image_size {image_size} is too small for objects up to {MAX_SIZE} px")
        self.seed, self.image_size, self.patch_size = seed, image_size, patch_size

    @property
    def grid(self) -> int:
        """Number of patches along each side of the image."""
        return self.image_size // self.patch_size

    def rng(self, i: int, stream: int) -> np.random.Generator:
        """The random generator of item ``i`` in a stream (0: scenes, 1+: question categories)."""
        return np.random.default_rng([self.seed, i, stream])

    def scene(self, i: int) -> Scene:
        """Scene ``i``: a deterministic function of ``(seed, i)``."""
        rng = self.rng(i, 0)
        objects = sample_objects(rng, int(rng.integers(1, 4)), self.image_size)
        return Scene(render(rng, objects, self.image_size), objects)

    def example(self, i: int, category: str) -> Example:
        """Example ``i`` of a question category: a deterministic function of ``(seed, i, category)``."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
        return sample_example(self.rng(i, 1 + CATEGORIES.index(category)), category, self.image_size)

    def object_patches(self, scene: Scene, min_pixels: int = 8) -> list[list[int]]:
        """Each object's patches (row-major): those holding at least ``min_pixels`` of its drawn pixels.

        A patch that two objects reach goes to the one with more pixels in it (to both on a tie).
        """
        n, p = self.image_size, self.patch_size
        counts = []
        for o in scene.objects:
            drawn = np.zeros((n, n), dtype=np.int64)
            x0, y0 = int(o.center[0] - o.size / 2), int(o.center[1] - o.size / 2)
            drawn[y0 : y0 + o.size, x0 : x0 + o.size] = shape_mask(o.shape, o.size)
            counts.append(drawn.reshape(self.grid, p, self.grid, p).sum((1, 3)).reshape(-1))
        most = np.max(counts, axis=0)
        return [np.flatnonzero((c >= min_pixels) & (c == most)).tolist() for c in counts]

    def patches_of(self, bbox: tuple[int, int, int, int]) -> list[int]:
        """Row-major indices of the patches that any pixel of a bounding box falls in."""
        x0, y0, x1, y1 = bbox
        p = self.patch_size
        return [r * self.grid + c for r in range(y0 // p, (y1 - 1) // p + 1) for c in range(x0 // p, (x1 - 1) // p + 1)]


def make_example(world: ShapesWorld, i: int, category: str) -> Example:
    """Example ``i`` of a category in ``world`` (see ``ShapesWorld.example``)."""
    return world.example(i, category)


def make_dataset(seed: int, n_per_category: int, categories: Sequence[str] = CATEGORIES) -> list[Example]:
    """``n_per_category`` examples of each category from world ``seed``, grouped by category."""
    world = ShapesWorld(seed)
    return [world.example(i, c) for c in categories for i in range(n_per_category)]
