"""Mapping bounding boxes in the original image to patches of the processed image."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

    from hooked_llava.inputs.llava_inputs import LlavaInputs

Box = tuple[float | int, float | int, float | int, float | int]  # (x0, y0, x1, y1)
# "exclusive": x1, y1 are exclusive (the documented default). "pil": both corners are inside the
# box, as when study B's code draws it with PIL's `ImageDraw.rectangle`: one pixel wider and taller.
BoxRule = Literal["exclusive", "pil"]


def _box(box: Box, box_rule: BoxRule) -> Box:
    """`box` with an exclusive far corner under either rule."""
    if box_rule not in ("exclusive", "pil"):
        raise ValueError(
            f"box_rule must be 'exclusive' (x1, y1 exclusive) or 'pil' (both corners inside), got {box_rule!r}."
        )
    x0, y0, x1, y1 = box
    return (x0, y0, x1 + 1, y1 + 1) if box_rule == "pil" else (x0, y0, x1, y1)


def resize_and_crop(image_size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, float, float]:
    """`(top, left, scale_y, scale_x)` of HF's CLIP preprocessing: the short side resized to
    `crop[0]` (the long side truncated to int), then a centre crop of `crop[1]`."""
    height, width = image_size
    shortest, side = crop
    new_h = shortest if height <= width else int(shortest * height / width)
    new_w = shortest if width <= height else int(shortest * width / height)
    return (new_h - side) // 2, (new_w - side) // 2, new_h / height, new_w / width


def box_to_patches(
    box: Box, image_size: tuple[int, int], crop: tuple[int, int], patch: int, box_rule: BoxRule = "exclusive"
) -> set[tuple[int, int]]:
    """Grid cells `(row, col)` that any pixel of `box` falls in, after the processor's
    shortest-edge resize to `crop[0]` and centre crop to `crop[1]`.

    `box` is `(x0, y0, x1, y1)` in original pixels, with `x1`, `y1` exclusive under
    `box_rule="exclusive"` (the default) and inclusive under `"pil"` (study B's code draws boxes
    with PIL, which fills both corners: one pixel wider and taller, to reproduce its numbers).
    """
    side = crop[1]
    top, left, sy, sx = resize_and_crop(image_size, crop)
    x0, y0, x1, y1 = _box(box, box_rule)
    px0, px1 = max(x0 * sx - left, 0.0), min(x1 * sx - left, side)
    py0, py1 = max(y0 * sy - top, 0.0), min(y1 * sy - top, side)
    if px1 <= px0 or py1 <= py0:
        return set()
    rows = range(int(py0 // patch), math.ceil(py1 / patch))
    cols = range(int(px0 // patch), math.ceil(px1 / patch))
    return {(r, c) for r in rows for c in cols}


def related_mask(inputs: LlavaInputs, box_rule: BoxRule = "exclusive") -> Bool[Tensor, "batch pos"]:
    """Image positions whose patch lies under any of the row's boxes (`box_rule`: see `box_to_patches`)."""
    _box((0, 0, 0, 0), box_rule)  # validates the rule even for rows without boxes
    if inputs.boxes is None:
        raise ValueError(
            "the 'related' role needs bounding boxes: pass `boxes=[[(x0, y0, x1, y1), ...], ...]` "
            "(one list per prompt, original-image pixels) to `model.prepare`."
        )
    if inputs.image_sizes is None or inputs.crop is None:
        raise ValueError(
            "the 'related' role needs the original image sizes and the processor's crop; use model.prepare."
        )
    if inputs.token_tables is not None or inputs.squash:
        return _related_by_overlap(inputs, box_rule)
    patch = inputs.crop[1] // inputs.grid_size
    rc, image_of = inputs.patch_rc(), inputs.image_index()
    mask = torch.zeros_like(inputs.input_ids, dtype=torch.bool)
    for row, row_boxes in enumerate(inputs.boxes):
        for pos in inputs.image_mask[row].nonzero()[:, 0].tolist():
            r, c = rc[row, pos].tolist()
            size = inputs.image_sizes[int(image_of[row, pos])]
            cells = (
                set().union(*(box_to_patches(b, size, inputs.crop, patch, box_rule) for b in row_boxes))
                if row_boxes
                else set()
            )
            mask[row, pos] = (r, c) in cells
    return mask


def _related_by_overlap(inputs: LlavaInputs, box_rule: BoxRule) -> Bool[Tensor, "batch pos"]:
    """LLaVA-NeXT: image tokens whose recorded pixel box overlaps any of the row's boxes."""
    table = image_map(inputs)
    mask = torch.zeros_like(inputs.input_ids, dtype=torch.bool)
    for t in table.itertuples():
        boxes = [_box(b, box_rule) for b in inputs.boxes[t.row]] if inputs.boxes else []
        mask[t.row, t.pos] = t.kind != "newline" and any(
            t.x0 < x1 and x0 < t.x1 and t.y0 < y1 and y0 < t.y1 for x0, y0, x1, y1 in boxes
        )
    return mask


def cell_box(r: int, c: int, image_size: tuple[int, int], crop: tuple[int, int], patch: int) -> tuple[float, ...]:
    """Original-image pixel box of grid cell (r, c) of a resized and centre-cropped image."""
    top, left, sy, sx = resize_and_crop(image_size, crop)
    return (
        (c * patch + left) / sx,
        (r * patch + top) / sy,
        ((c + 1) * patch + left) / sx,
        ((r + 1) * patch + top) / sy,
    )


def image_map(inputs: LlavaInputs) -> pd.DataFrame:
    """One row per image token: batch `row`, `pos`, `image`, `kind` ("base", "highres",
    "newline"), vision-batch `tile`, `grid_row`/`grid_col` (base or unpadded high-res grid),
    `tile_row`/`tile_col` (the patch inside the tile) and the pixel box `x0, y0, x1, y1` it
    covers in the original image."""
    import pandas as pd

    mask, image_of = inputs.image_mask, inputs.image_index()
    rows, positions = mask.nonzero(as_tuple=True)
    if inputs.token_tables is not None:
        table = [t for per_image in inputs.token_tables for t in per_image]
    else:
        rc = inputs.patch_rc()[mask].tolist()
        patch = inputs.crop[1] // inputs.grid_size if inputs.crop else 0
        table = []
        for (r, c), img in zip(rc, image_of[mask].tolist(), strict=True):
            size = inputs.image_sizes[img] if inputs.image_sizes and inputs.crop else None
            box = cell_box(r, c, size, inputs.crop, patch) if size and r >= 0 else None
            if inputs.squash and size and r >= 0:  # resized straight to a square: cells scale evenly
                g, (h, w) = inputs.grid_size, size
                box = (c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g)
            table.append(("base" if r >= 0 else "cls", 0, r, c, r, c, box))
    nan = (float("nan"),) * 4
    records = [
        (int(row), int(pos), int(img), kind, tile, gr, gc, tr, tc, *(box or nan))
        for row, pos, img, (kind, tile, gr, gc, tr, tc, box) in zip(
            rows.tolist(), positions.tolist(), image_of[mask].tolist(), table, strict=True
        )
    ]
    columns = ["row", "pos", "image", "kind", "tile", "grid_row", "grid_col", "tile_row", "tile_col"]
    return pd.DataFrame(records, columns=columns + ["x0", "y0", "x1", "y1"])
