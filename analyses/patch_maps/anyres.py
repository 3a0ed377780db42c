"""Patch importance for any image layout, LLaVA-NeXT's anyres tiles included.

`token_importance` scores every image token of a row (study A's patch tool, or its
attention baseline); `anyres_maps` lays the scores out on the base grid and on the unpadded
high-resolution grid using the inputs' position map (`inputs.image_map()`), and
`analyses.plotting.figures.plot_anyres_maps` draws both over the original image through each token's
pixel box. For LLaVA-1.5 inputs `patch_importance` gives the same grid directly.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.attribution.contributions import Target, last_query, run_at_last
from analyses.attribution.scores import log_prob_increase
from hooked_llava import HookedLlava, LlavaInputs

TokenMethod = Literal["log_prob_increase", "attention"]


def _patch_tokens(inputs: LlavaInputs) -> Tensor:
    """Image tokens that come from pixels (newline rows excluded)."""
    mask = inputs.image_mask.clone()
    table = inputs.image_map()
    newline = table[table.kind == "newline"]
    mask[newline.row.to_list(), newline.pos.to_list()] = False
    return mask


def _normalise(values: Tensor, mask: Tensor) -> Tensor:
    """Study A's normalisation over the masked entries of each row: min-max, then divide by the sum."""
    out = torch.zeros_like(values)
    for b in range(values.shape[0]):
        v = values[b, mask[b]]
        spread = (v - v.min()) / (v.max() - v.min()) if v.max() > v.min() else torch.ones_like(v)
        out[b, mask[b]] = spread / spread.sum()
    return out


@torch.no_grad()
def token_importance(
    model: HookedLlava, inputs: LlavaInputs, method: TokenMethod = "log_prob_increase", target: Target = None
) -> Float[Tensor, "batch pos"]:
    """Importance of every image token for the answer; zero at other positions and newlines.

    Args:
        model: the model.
        inputs: the prepared batch (any layout: LLaVA-1.5 grids or LLaVA-NeXT tiles).
        method: "log_prob_increase" (study A's tool: each row's top head by log-probability
            increase, its per-position scores, min-max normalised and divided by the sum) or
            "attention" (mean attention from the last position over all heads and layers).
        target: the explained token (default: the model's top-1 prediction).

    Example:
        >>> scores = token_importance(model, inputs)  # [batch, pos], sums to 1 over each row's patches
    """
    patches = _patch_tokens(inputs)
    if method == "attention":
        names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
        acts = run_at_last(model, inputs, [], dict.fromkeys(names, last_query(inputs)))
        mean = torch.stack([acts[name] for name in names]).float().mean(dim=(0, 2))  # [batch, key]
        return torch.where(patches.to(mean.device), mean, 0.0)
    if method != "log_prob_increase":
        raise ValueError(f"method must be 'log_prob_increase' or 'attention', got {method!r}.")
    heads = log_prob_increase(model, inputs, unit="head", target=target)
    rows = []
    for b in range(len(inputs)):
        layer, head = divmod(int(heads[b].flatten().argmax()), model.cfg.n_heads)
        rows.append(log_prob_increase(model, inputs[b], unit="position", head=(layer, head), target=target)[0])
    scores = torch.stack(rows).float()
    return _normalise(scores, patches.to(scores.device))


def anyres_maps(inputs: LlavaInputs, values: Float[Tensor, "batch pos"]) -> list[dict[str, Tensor]]:
    """Per row, token values laid out as `{"base": [g, g], "highres": [rows, cols]}` (NaN where
    no token lands); LLaVA-1.5 rows only have "base".

    Example:
        >>> anyres_maps(inputs, token_importance(model, inputs))[0]["base"].shape  # NeXT rows add "highres"
    """
    table = inputs.image_map()
    maps = []
    for b in range(len(inputs)):
        here = table[(table.row == b) & (table.kind != "newline") & (table.kind != "cls")]
        row_maps = {}
        for kind in ("base", "highres"):
            cells = here[here.kind == kind]
            if not len(cells):
                continue
            grid = torch.full((int(cells.grid_row.max()) + 1, int(cells.grid_col.max()) + 1), float("nan"))
            grid[cells.grid_row.to_list(), cells.grid_col.to_list()] = values[b, cells.pos.to_list()].float().cpu()
            row_maps[kind] = grid
        maps.append(row_maps)
    return maps
