"""LLaVA-NeXT ("anyres") bookkeeping: tiles, unpadding, newline rows, and where every image
token comes from.

An image becomes a base view (the whole image squashed to one tile) plus high-resolution
tiles cut from the image resized into the best grid of `image_grid_pinpoints` and
letterboxed. The high-resolution feature map is reassembled from the tiles, the rows or
columns that only saw letterbox padding are cut away ("unpad"), and a learned newline vector
ends every row. `layout` reproduces HF's order exactly and records, for each token, its
kind, tile, grid cell and the pixel box it covers in the original image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BASE, HIGHRES, NEWLINE = "base", "highres", "newline"


def best_resolution(size: tuple[int, int], pinpoints: list[tuple[int, int]]) -> tuple[int, int]:
    """HF's choice of grid resolution `(height, width)` for an image of `size` `(height, width)`."""
    from transformers.image_processing_utils import select_best_resolution

    return tuple(select_best_resolution(tuple(size), [list(p) for p in pinpoints]))  # type: ignore[return-value]


@dataclass(frozen=True)
class Layout:
    """Geometry of one image: `tiles` high-res tiles of `grid` cells each side (the base tile
    is vision batch row 0), the full high-res grid `full`, and the unpadded crop `rows × cols`
    starting at `offset` in the full grid."""

    size: tuple[int, int]  # original (height, width)
    resolution: tuple[int, int]  # best (height, width)
    tile_px: int
    grid: int
    tiles: tuple[int, int]  # tiles (down, across)
    offset: tuple[int, int]  # unpadded crop start in the full feature grid (row, col)
    rows: int
    cols: int

    @property
    def n_tokens(self) -> int:
        return self.grid**2 + self.rows * (self.cols + 1)

    @property
    def n_vision_rows(self) -> int:
        return 1 + self.tiles[0] * self.tiles[1]


def make_layout(size: tuple[int, int], pinpoints: list[tuple[int, int]], tile_px: int, patch: int) -> Layout:
    """The layout HF's `pack_image_features` produces, unpadding in feature-grid units as HF does."""
    height, width = size
    res = best_resolution(size, pinpoints)
    grid = tile_px // patch
    tiles = (res[0] // tile_px, res[1] // tile_px)
    full_h, full_w = tiles[0] * grid, tiles[1] * grid
    top = left = 0
    if width / height > full_w / full_h:
        new_h = int(round(height * (full_w / width), 7))
        top = (full_h - new_h) // 2
    else:
        new_w = int(round(width * (full_h / height), 7))
        left = (full_w - new_w) // 2
    return Layout(tuple(size), res, tile_px, grid, tiles, (top, left), full_h - 2 * top, full_w - 2 * left)


def pack(features: Tensor, layout: Layout, newlines: Tensor) -> Tensor:
    """One image's projected features `[1 + n_tiles, grid², d]` and its newline rows `[rows, d]`
    → HF's packed sequence `[n_tokens, d]`."""
    g, (th, tw) = layout.grid, layout.tiles
    base, tiles = features[0], features[1 : layout.n_vision_rows]
    full = tiles.view(th, tw, g, g, -1).permute(0, 2, 1, 3, 4).reshape(th * g, tw * g, -1)
    top, left = layout.offset
    crop = full[top : top + layout.rows, left : left + layout.cols]
    rows = torch.cat([crop, newlines.to(crop.dtype)[:, None]], dim=1)
    return torch.cat([base, rows.reshape(-1, rows.shape[-1])], dim=0)


def _highres_box(layout: Layout, r: int, c: int, patch: int) -> tuple[float, float, float, float]:
    """Original-image pixel box of unpadded high-res cell (r, c), clipped to the image."""
    height, width = layout.size
    res_h, res_w = layout.resolution
    scale_w, scale_h = res_w / width, res_h / height
    if scale_w < scale_h:
        new_w, new_h = res_w, min(math.ceil(height * scale_w), res_h)
    else:
        new_h, new_w = res_h, min(math.ceil(width * scale_h), res_w)
    paste_x, paste_y = (res_w - new_w) // 2, (res_h - new_h) // 2
    row, col = r + layout.offset[0], c + layout.offset[1]
    x0, x1 = ((col * patch - paste_x) * width / new_w, ((col + 1) * patch - paste_x) * width / new_w)
    y0, y1 = ((row * patch - paste_y) * height / new_h, ((row + 1) * patch - paste_y) * height / new_h)
    return (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))


def token_table(layout: Layout, patch: int) -> list[tuple]:
    """Per image token, in sequence order: `(kind, tile, row, col, tile_row, tile_col, box)`.

    `tile` is the vision-batch row (0 is the base view); `row, col` index the base grid or
    the unpadded high-res grid; `tile_row, tile_col` the cell inside the tile (the patch the
    vision tower saw); `box` is `(x0, y0, x1, y1)` in original pixels (None for newlines).
    """
    height, width = layout.size
    g = layout.grid
    sx, sy = width / g, height / g
    table = [(BASE, 0, r, c, r, c, (c * sx, r * sy, (c + 1) * sx, (r + 1) * sy)) for r in range(g) for c in range(g)]
    for r in range(layout.rows):
        for c in range(layout.cols):
            fr, fc = r + layout.offset[0], c + layout.offset[1]
            tile = 1 + (fr // g) * layout.tiles[1] + fc // g
            table.append((HIGHRES, tile, r, c, fr % g, fc % g, _highres_box(layout, r, c, patch)))
        table.append((NEWLINE, -1, r, layout.cols, -1, -1, None))
    return table
