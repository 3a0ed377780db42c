"""LLaVA-OneVision packing: images (anyres_max), several images per prompt, and video, with the
position map of every token.

- A prompt with one image: as LLaVA-NeXT (`hooked_llava.model.next`), a base view, then the unpadded
  high-resolution grid with a newline after every row; but when that grid holds more than
  `max_num_patches` base views' worth of cells (ratio > 1.1), it is downsampled bilinearly to
  `⌊rows / ratio⌋ × ⌊cols / ratio⌋` before the newlines are added. A downsampled cell covers a
  larger box of pixels, which `token_table` records.
- A prompt with several images: each image is its base view only, followed by one newline.
- A video: each frame is encoded as a base view, its feature grid pooled 2×2 (bilinear, to
  `⌈grid / 2⌉` a side), the frames concatenated, and one newline after the video.

Functions here mirror HF's `pack_image_features`, `get_video_features` and `apply_pooling` in their
order of operations (the interpolation runs channels-first, as there), so the numerics match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hooked_llava.model import next as next_

BASE, HIGHRES, NEWLINE, FRAME = "base", "highres", "newline", "frame"


@dataclass(frozen=True)
class Packing:
    """How one image is packed: its NeXT `layout`, whether it is one of several images of its prompt
    (`multi`: base view and one newline), and the high-res grid after downsampling (`out_rows × out_cols`,
    equal to the unpadded grid when no downsampling happens)."""

    layout: next_.Layout
    multi: bool
    out_rows: int
    out_cols: int

    @property
    def downsampled(self) -> bool:
        return (self.out_rows, self.out_cols) != (self.layout.rows, self.layout.cols)

    @property
    def n_tokens(self) -> int:
        g = self.layout.grid
        return g * g + 1 if self.multi else g * g + self.out_rows * (self.out_cols + 1)

    @property
    def n_vision_rows(self) -> int:
        return 1 if self.multi else self.layout.n_vision_rows

    @property
    def n_newlines(self) -> int:
        return 1 if self.multi else self.out_rows


def make_packing(layout: next_.Layout, multi: bool, max_num_patches: int) -> Packing:
    """HF's rule: downsample when `sqrt(rows·cols / (max_num_patches·grid²)) > 1.1`."""
    rows, cols = layout.rows, layout.cols
    ratio = math.sqrt(rows * cols / (max_num_patches * layout.grid**2))
    if not multi and ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return Packing(layout, multi, rows, cols)


def pack(features: Tensor, packing: Packing, newlines: Tensor) -> Tensor:
    """One image's projected features `[n_views, grid², d]` and its newlines `[n_newlines, d]` → its
    packed sequence `[n_tokens, d]`."""
    base = features[0]
    if packing.multi:
        return torch.cat([base, newlines.to(base.dtype)], dim=0)
    lay = packing.layout
    g, (th, tw) = lay.grid, lay.tiles
    tiles = features[1 : lay.n_vision_rows]
    grid = tiles.view(th, tw, g, g, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # [d, H, W]
    top, left = lay.offset
    grid = grid[:, top : top + lay.rows, left : left + lay.cols]
    if packing.downsampled:
        grid = F.interpolate(grid[None], [packing.out_rows, packing.out_cols], mode="bilinear")[0]
    ends = newlines.to(grid.dtype).T[:, :, None]  # [d, rows, 1]
    grid = torch.cat([grid, ends], dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat([base, grid], dim=0)


def pooled_side(grid: int) -> int:
    return math.ceil(grid / 2)


def pack_video(features: Tensor, grid: int, newline: Tensor) -> Tensor:
    """One video's projected frame features `[frames, grid², d]` → `[frames · ⌈grid/2⌉² + 1, d]`."""
    frames, _, d = features.shape
    x = features.view(frames, grid, grid, d).permute(0, 3, 1, 2)
    side = pooled_side(grid)
    x = F.interpolate(x, size=[side, side], mode="bilinear").permute(0, 2, 3, 1).reshape(frames * side * side, d)
    return torch.cat([x, newline.to(x.dtype)[None]], dim=0)


def _pixel_box(lay: next_.Layout, r0: float, c0: float, r1: float, c1: float, patch: int) -> tuple[float, ...]:
    """Original-image pixel box of the unpadded high-res grid region rows `r0..r1`, cols `c0..c1`
    (grid units, fractional allowed), clipped to the image."""
    height, width = lay.size
    res_h, res_w = lay.resolution
    scale_w, scale_h = res_w / width, res_h / height
    if scale_w < scale_h:
        new_w, new_h = res_w, min(math.ceil(height * scale_w), res_h)
    else:
        new_h, new_w = res_h, min(math.ceil(width * scale_h), res_w)
    paste_x, paste_y = (res_w - new_w) // 2, (res_h - new_h) // 2
    to_x = lambda c: ((c + lay.offset[1]) * patch - paste_x) * width / new_w  # noqa: E731
    to_y = lambda r: ((r + lay.offset[0]) * patch - paste_y) * height / new_h  # noqa: E731
    return (max(to_x(c0), 0.0), max(to_y(r0), 0.0), min(to_x(c1), float(width)), min(to_y(r1), float(height)))


def _clipped(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> tuple[float, ...] | None:
    """The box clipped to the image, or None when it lies wholly in the padding."""
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return box if box[2] > box[0] and box[3] > box[1] else None


def token_table(packing: Packing, patch: int) -> list[tuple]:
    """Per token of one image, in sequence order: `(kind, tile, row, col, tile_row, tile_col, box)`
    as `next.token_table`. A downsampled cell `(r, c)` stands for the region rows
    `[r·s_r, (r+1)·s_r)`, cols `[c·s_c, (c+1)·s_c)` of the unpadded grid (`s = unpadded / downsampled`;
    the bilinear sample sits at its centre); its box is that region's, and its tile and in-tile cell are
    those of the cell holding the region's centre."""
    lay = packing.layout
    if not packing.multi and not packing.downsampled:
        return next_.token_table(lay, patch)
    g = lay.grid
    height, width = lay.size
    if packing.multi:  # the processor pads the image to a square (centred), then resizes it
        side = max(height, width)
        dx, dy, step = (side - width) // 2, (side - height) // 2, side / g
        clip = lambda x0, y0, x1, y1: _clipped(x0, y0, x1, y1, width, height)  # noqa: E731
        cells = [
            (BASE, 0, r, c, r, c, clip(c * step - dx, r * step - dy, (c + 1) * step - dx, (r + 1) * step - dy))
            for r in range(g)
            for c in range(g)
        ]
        return cells + [(NEWLINE, -1, 0, g, -1, -1, None)]
    sx, sy = width / g, height / g
    table = [(BASE, 0, r, c, r, c, (c * sx, r * sy, (c + 1) * sx, (r + 1) * sy)) for r in range(g) for c in range(g)]
    s_r, s_c = lay.rows / packing.out_rows, lay.cols / packing.out_cols
    for r in range(packing.out_rows):
        for c in range(packing.out_cols):
            fr = int((r + 0.5) * s_r) + lay.offset[0]
            fc = int((c + 0.5) * s_c) + lay.offset[1]
            tile = 1 + (fr // g) * lay.tiles[1] + fc // g
            box = _pixel_box(lay, r * s_r, c * s_c, (r + 1) * s_r, (c + 1) * s_c, patch)
            table.append((HIGHRES, tile, r, c, fr % g, fc % g, box))
        table.append((NEWLINE, -1, r, packing.out_cols, -1, -1, None))
    return table


def video_table(frames: int, grid: int, size: tuple[int, int]) -> list[tuple]:
    """Per token of one video: `(FRAME, frame, row, col, -1, -1, box)` on the pooled grid, the box in
    the frame's `(height, width)` pixels (frames are resized to a square, so cells scale evenly), then
    the newline."""
    side = pooled_side(grid)
    height, width = size
    sx, sy = width / side, height / side
    table = [
        (FRAME, f, r, c, -1, -1, (c * sx, r * sy, (c + 1) * sx, (r + 1) * sy))
        for f in range(frames)
        for r in range(side)
        for c in range(side)
    ]
    return table + [(NEWLINE, -1, 0, side, -1, -1, None)]
