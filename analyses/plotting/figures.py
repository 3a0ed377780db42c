"""Figures for the analyses' results. These functions only draw; they compute nothing about the model.

Every function returns a matplotlib `Figure` built with the object-oriented API (no pyplot
state, no `show`), so it works under the Agg backend and in notebooks alike.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from hooked_llava import LlavaInputs
from hooked_llava.inputs.images import to_rgb

# The OpenAI CLIP normalisation that LLaVA-1.5's image processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _figure(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_logit_lens(
    table: pd.DataFrame,
    value: str = "prob",
    batch: int = 0,
    position: int | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """One line per tracked token form across layers, from `token_ranks`.

    Args:
        table: output of `analyses.lens.logit.token_ranks`.
        value: "prob", "rank" (drawn on a log axis) or "logit".
        batch: which row to draw.
        position: which sequence position (default: the first in the table for that row).
        ax: an existing axes to draw into.
        title: the title (default: names the row and the sequence position shown).

    Example:
        >>> from analyses import logit_lens, token_ranks
        >>> fig = plot_logit_lens(token_ranks(model, logit_lens(model, inputs), ["red"]))
        >>> fig.savefig("lens.png")
    """
    rows = table[table["batch"] == batch]
    if rows.empty:
        raise ValueError(f"the table has no rows for batch {batch}.")
    position = int(rows["position"].iloc[0]) if position is None else position
    rows = rows[rows["position"] == position]
    fig, ax = _figure(ax, (6.0, 4.0))
    for form, line in rows.groupby("form", sort=False):
        line = line.sort_values("layer")
        ax.plot(line["layer"], line[value], marker="o", label=repr(form))
    if value == "rank":
        ax.set_yscale("log")
        ax.invert_yaxis()
    ax.set(
        xlabel="layer (resid_pre; last = final resid_post)",
        ylabel={"prob": "probability", "rank": "rank (1 = top)"}.get(value, value),
        title=title or f"logit lens, row {batch}, position {position}",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="token")
    return fig


def plot_head_scores(
    scores: Float[Tensor, "layer head"] | Float[Tensor, "batch layer head"],
    batch: int = 0,
    title: str = "log-probability increase per head",
    ax: Axes | None = None,
    cmap: str = "RdBu_r",
    label: str = "log-probability increase (nats)",
) -> Figure:
    """Heatmap of head scores, layers down and heads across, centred on zero.

    Args:
        scores: `[layer, head]` or `[batch, layer, head]` (e.g. `log_prob_increase(unit="head")`).
        batch: which row to draw for a batched tensor.
        title, ax, cmap: figure options.
        label: the colourbar's label (what the scores measure).

    Example:
        >>> from analyses import log_prob_increase
        >>> fig = plot_head_scores(log_prob_increase(model, inputs, unit="head"))
    """
    grid = (scores[batch] if scores.ndim == 3 else scores).detach().float().cpu().numpy()
    fig, ax = _figure(ax, (max(5.0, 1 + 0.3 * grid.shape[1]), max(3.5, 1 + 0.25 * grid.shape[0])))
    limit = float(np.abs(grid).max()) or 1.0
    image = ax.imshow(grid, cmap=cmap, vmin=-limit, vmax=limit, aspect="auto")
    ax.set(xlabel="head", ylabel="layer", title=title)
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label=label)
    return fig


def processed_image(
    image: Any,
    row: int = 0,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    size: int | None = None,
) -> np.ndarray:
    """The image the vision tower saw, as an `[h, w, 3]` float array in [0, 1].

    Args:
        image: `LlavaInputs` (its `pixel_values` are un-normalised with `mean`/`std`), a
            `[3, h, w]` normalised tensor, or a PIL image (resized so the shortest side is
            `size`, default its shortest side, then centre-cropped to a square).
        row: the batch row whose image to take, for `LlavaInputs`.
        mean, std: the image processor's normalisation (`processor.image_processor.image_mean`).
        size: target side for PIL images.

    Example:
        >>> processed_image(inputs).shape  # (32, 32, 3) here, (336, 336, 3) for LLaVA-1.5
    """
    if isinstance(image, LlavaInputs):
        if image.pixel_values is None:
            raise ValueError("these inputs hold no image.")
        image = image.pixel_values[image.image_rows().index(row)]
    if isinstance(image, Tensor):
        pixels = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
        return pixels.permute(1, 2, 0).clamp(0, 1).numpy()
    from PIL import Image

    image = to_rgb(image)  # as the model is shown it: 16-bit, float and paletted images scaled as prepare does
    side = size or min(image.size)
    scale = side / min(image.size)
    w, h = round(image.width * scale), round(image.height * scale)
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(image.crop((left, top, left + side, top + side)), dtype=np.float32) / 255.0


def plot_patch_heatmap(
    image: Any,
    heat: Float[Tensor, "grid_h grid_w"] | Float[Tensor, "batch grid_h grid_w"],
    row: int = 0,
    alpha: float = 0.5,
    title: str | None = None,
    ax: Axes | None = None,
    cmap: str = "jet",
    label: str | None = None,
    **image_options: Any,
) -> Figure:
    """Overlay a patch map, upsampled bicubically, on the processed image.

    Args:
        image: `LlavaInputs`, a normalised `[3, h, w]` tensor, or a PIL image (see `processed_image`).
        heat: `[grid_h, grid_w]` or `[batch, grid_h, grid_w]` (e.g. `patch_importance`).
        row: the batch row to draw.
        alpha: opacity of the heatmap.
        title, ax, cmap: figure options.
        label: the colourbar's label (what the map measures).
        **image_options: `mean`, `std`, `size` for `processed_image`.

    Example:
        >>> from analyses import patch_importance
        >>> fig = plot_patch_heatmap(inputs, patch_importance(model, inputs), row=0)
    """
    picture = processed_image(image, row, **image_options)
    grid = (heat[row] if heat.ndim == 3 else heat).detach().float().cpu()
    up = F.interpolate(grid[None, None], size=picture.shape[:2], mode="bicubic", align_corners=False)[0, 0]
    up = up.clamp(float(grid.min()), float(grid.max())).numpy()  # bicubic overshoots; keep the map's range
    fig, ax = _figure(ax, (5.0, 4.5))
    ax.imshow(picture)
    overlay = ax.imshow(up, cmap=cmap, alpha=alpha)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.colorbar(overlay, ax=ax, fraction=0.046, pad=0.04, label=label)
    return fig


def _paint(inputs: LlavaInputs, values: Tensor, row: int, kind: str, size: tuple[int, int]) -> np.ndarray:
    """Average of the token values over each original-image pixel their boxes cover."""
    table = inputs.image_map()
    here = table[(table.row == row) & (table.kind == kind)]
    heat, count = np.zeros(size), np.zeros(size)
    for t in here.itertuples():
        y0, y1 = int(np.floor(t.y0)), int(np.ceil(t.y1))
        x0, x1 = int(np.floor(t.x0)), int(np.ceil(t.x1))
        heat[y0:y1, x0:x1] += float(values[row, t.pos])
        count[y0:y1, x0:x1] += 1
    return np.where(count > 0, heat / np.maximum(count, 1), np.nan)


def plot_anyres_maps(
    image: Any,
    inputs: LlavaInputs,
    values: Float[Tensor, "batch pos"],
    row: int = 0,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Figure:
    """Token importances drawn over the original image through each token's pixel box: one panel
    for the base view and, for LLaVA-NeXT, one for the high-resolution tiles.

    Args:
        image: the original PIL image of `row`.
        inputs: the prepared batch (its `image_map()` gives the boxes).
        values: `[batch, pos]` token values, e.g. `analyses.patch_maps.anyres.token_importance`.
        row, alpha, cmap: which row, heat opacity, colour map.

    Example:
        >>> fig = plot_anyres_maps(random_images(1)[0], inputs, torch.rand(inputs.shape))  # e.g. token_importance
    """
    kinds = [k for k in ("base", "highres") if (inputs.image_map().kind == k).any()]
    fig = Figure(figsize=(4.2 * len(kinds), 4.0), layout="constrained")
    pixels = np.asarray(to_rgb(image))
    for k, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), k + 1)
        ax.imshow(pixels)
        shown = ax.imshow(_paint(inputs, values, row, kind, pixels.shape[:2]), alpha=alpha, cmap=cmap)
        fig.colorbar(shown, ax=ax, shrink=0.8)
        ax.set(title=f"{kind} tokens", xticks=[], yticks=[])
    return fig
