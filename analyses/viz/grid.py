"""Which picture an explorer draws, and where each image token sits on its patch grid.

A LLaVA-1.5 row holds one image, and its patch grid is the whole picture. Tiled inputs (LLaVA-NeXT,
LLaVA-OneVision) hold a base view and high-resolution tiles: the explorers draw the base view of the
row's first image with its tokens on the base grid, and leave out the row's other image tokens (the
tiles, their newline tokens and any further image), saying how many. The picture is un-normalised
with the checkpoint's own image mean and std (CLIP's and SigLIP's differ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analyses.plotting.figures import CLIP_MEAN, CLIP_STD, processed_image
from hooked_llava import LlavaInputs


@dataclass
class ImageGrid:
    """The picture drawn for one batch row and its patch grid.

    Attributes:
        image: the picture as the vision tower saw it, `[h, w, 3]` in [0, 1].
        grid: side of the square patch grid.
        cells: sequence position → `(row, col)` on the grid, for every drawn image token.
        hidden: the row's image positions that are not drawn (tiles, newlines, other images).
        vision_index: the drawn view's index in the vision tower's batch.
    """

    image: np.ndarray
    grid: int
    cells: dict[int, tuple[int, int]]
    hidden: list[int]
    vision_index: int

    def positions(self) -> list[int]:
        """Sequence position of every grid cell, row-major (`cell = row * grid + col`)."""
        where = {rc: p for p, rc in self.cells.items()}
        return [where[(r, c)] for r in range(self.grid) for c in range(self.grid)]

    def note(self) -> str:
        """What the view leaves out, in words ("" when it shows every image token)."""
        if not self.hidden:
            return ""
        return f"base view shown; {len(self.hidden)} tile and newline tokens left out"


def image_grid(model: Any, inputs: LlavaInputs, row: int) -> ImageGrid:
    """The picture and patch grid an explorer draws for batch row `row`.

    Example:
        >>> image_grid(model, inputs, 0).grid  # 4 here (a 4 x 4 grid), 24 for LLaVA-1.5-7B
        4
    """
    if inputs.pixel_values is None or not bool(inputs.image_mask[row].any()):
        raise ValueError(f"row {row} holds no image: the explorers draw one (give the row an image).")
    mean, std = _normalisation(model)
    if inputs.token_tables is None:
        rc, image = inputs.patch_rc()[row].cpu(), inputs.image_mask[row].cpu()
        cells = {p: tuple(rc[p].tolist()) for p in image.nonzero()[:, 0].tolist() if rc[p, 0] >= 0}
        index = inputs.image_rows().index(row)
        picture = processed_image(inputs.pixel_values[index], mean=mean, std=std)
        return ImageGrid(picture, inputs.grid_size, cells, [], index)
    table = inputs.image_map()
    table = table[table["row"] == row]
    first = int(table["image"].min())
    base = table[(table["image"] == first) & (table["kind"] == "base")]
    grid = int(round(len(base) ** 0.5))
    if grid * grid != len(base) or grid == 0:
        raise ValueError(f"row {row}'s first image has {len(base)} base-view tokens, not a square grid.")
    cells = {int(p): (int(r), int(c)) for p, r, c in zip(base["pos"], base["grid_row"], base["grid_col"], strict=True)}
    hidden = sorted(set(table["pos"].tolist()) - set(cells))
    picture = processed_image(inputs.pixel_values[first][0], mean=mean, std=std)
    return ImageGrid(picture, grid, cells, hidden, int(base["tile"].iloc[0]))


def _normalisation(model: Any) -> tuple[Any, Any]:
    """The image processor's mean and std (CLIP's where the model has no processor)."""
    images = getattr(getattr(model, "processor", None), "image_processor", None)
    mean, std = getattr(images, "image_mean", None), getattr(images, "image_std", None)
    return (mean, std) if mean is not None and std is not None else (CLIP_MEAN, CLIP_STD)
