"""Where the image patches sit: the sequence position of every cell of the LLaVA-1.5 patch grid.

Positions map to the grid through `inputs.patch_rc()`; no offsets are hard-coded. Every row must
hold exactly one image (LLaVA-NeXT tiles: see `analyses.patch_maps.anyres`).

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_llava import LlavaInputs


def grid_positions(inputs: LlavaInputs) -> Int[Tensor, "batch cell"]:
    """Sequence position of every patch-grid cell, row-major (`cell = row * grid + col`).

    Example:
        >>> grid_positions(inputs)[0, :3]  # positions of the first three patches of row 0
    """
    rc, g = inputs.patch_rc(), inputs.grid_size
    found = rc[..., 0] >= 0
    if inputs.token_tables is not None or not bool((found.sum(1) == g * g).all()):
        raise ValueError(
            f"patch maps need exactly one LLaVA-1.5 image ({g}x{g} patches) per row; got {found.sum(1).tolist()} "
            "patches per row. For LLaVA-NeXT tiles use analyses.patch_maps.anyres (token_importance, anyres_maps, "
            "plot_anyres_maps); give several images one row each."
        )
    b, pos = found.nonzero(as_tuple=True)
    cells = torch.full((len(inputs), g * g), -1, dtype=torch.long, device=rc.device)
    cells[b, rc[b, pos, 0] * g + rc[b, pos, 1]] = pos
    return cells


def to_grid(inputs: LlavaInputs, values: Float[Tensor, "batch pos"]) -> Float[Tensor, "batch grid_h grid_w"]:
    """Per-position values (image positions only) laid out on the patch grid, row-major.

    Example:
        >>> to_grid(inputs, torch.arange(inputs.input_ids.shape[1]).float().expand(2, -1))[0]
    """
    cells = grid_positions(inputs).to(values.device)
    return values.gather(1, cells).reshape(len(inputs), inputs.grid_size, inputs.grid_size)
