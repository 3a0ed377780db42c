"""Which image patches matter for the answer: three maps on the patch grid.

- "log_prob_increase": study A's one-pass tool. The top head(s) by log-probability increase,
  then the per-position scores inside them at the image positions, min-max normalised and
  divided by their sum, reshaped row-major to the patch grid.
- "attention": study A's baseline, the mean attention from the last position to each image
  position over all heads of all layers.
- "occlusion": the slow causal reference. Each patch's merged embedding (`hook_embed`) is
  replaced by a baseline vector in turn; the score is the drop in the answer's log-probability
  (see `analyses.patch_maps.occlusion`, which also measures the maps' faithfulness).

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from analyses import ranges
from analyses.attribution.contributions import (
    FrozenReadout,
    Target,
    head_vectors,
    last_query,
    position_vectors,
    run_at_last,
    stack_layers,
)
from analyses.patch_maps.grid import grid_positions, to_grid
from analyses.patch_maps.occlusion import Baseline, occluded_log_probs
from hooked_llava import HookedLlava, LlavaInputs

Method = Literal["log_prob_increase", "attention", "occlusion"]


def _normalise(scores: Float[Tensor, "batch cell"]) -> Float[Tensor, "batch cell"]:
    """Min-max normalise, then divide by the sum (a constant row becomes uniform)."""
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    spread = (scores - low) / (high - low).clamp_min(torch.finfo(scores.dtype).tiny)
    spread = torch.where(high > low, spread, torch.ones_like(spread))
    return spread / spread.sum(1, keepdim=True)


def _warn_below_noise(scores: Float[Tensor, "batch cell"], dtype: torch.dtype) -> None:
    """Warn when a row's scores span less than the rounding noise of log-probabilities read out in
    `dtype` (about 100 ulps of 1 nat: ~1e-5 in float32), where min-max normalising maps noise."""
    floor = 100 * torch.finfo(dtype).eps
    spread = scores.amax(1) - scores.amin(1)
    rows = ((spread > 0) & (spread <= floor)).nonzero()[:, 0].tolist()
    if rows:
        warnings.warn(
            f"patch scores of row(s) {rows} span {float(spread[rows].max()):.1e} nats, below the {dtype} readout's "
            f"noise floor (~{floor:.0e}): the map shows rounding noise. Pass dtype=torch.float64.",
            stacklevel=4,
        )


def _choose_heads(
    head_scores: Tensor, heads: Sequence[tuple[int, int]] | None, n_heads: int
) -> list[list[tuple[int, int]]]:
    if heads is not None and not heads:
        raise ValueError("the log_prob_increase map needs at least one head: give heads=[(layer, head)].")
    n_layers, n = head_scores.shape[1:]
    if heads is not None:
        checked = [(ranges.index(lay, n_layers, "layer"), ranges.index(h, n, "head")) for lay, h in heads]
        return [checked] * head_scores.shape[0]
    n_heads = ranges.count(n_heads, "n_top_heads", 1, n_layers * n)
    top = head_scores.flatten(1).topk(n_heads, dim=1).indices.tolist()
    return [[(i // n, i % n) for i in row] for row in top]


def _slot_scores(
    model: HookedLlava, acts: dict, x: Tensor, readout: FrozenReadout, cells: Tensor, picks: list
) -> Tensor:
    """Scores of the image positions (`cells`, grid order) inside head `picks[b]` of each row b."""
    vectors, residuals = [], []
    for b, (layer, head) in enumerate(picks):
        pattern, v = (acts[f"blocks.{layer}.attn.{h}"][b : b + 1] for h in ("hook_pattern", "hook_v"))
        vectors.append(position_vectors(model, layer, head, pattern, v)[0, cells[b].to(v.device)])
        residuals.append(x[b, layer])
    return readout.score(torch.stack(residuals)[:, None], torch.stack(vectors))


def _lpi_map(
    model: HookedLlava,
    inputs: LlavaInputs,
    heads: Sequence[tuple[int, int]] | None,
    n_heads: int,
    target: Target,
    dtype: torch.dtype | None,
) -> Tensor:
    """One forward pass: head scores, then position scores inside the chosen head(s)."""
    n, cells = model.cfg.n_layers, grid_positions(inputs)
    layers = range(n) if heads is None else sorted({ranges.index(layer, n, "layer") for layer, _ in heads})
    extra = {f"blocks.{i}.attn.hook_v": (lambda a: a) for i in layers}
    extra.update({f"blocks.{i}.attn.hook_pattern": last_query(inputs) for i in layers})
    names = [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "attn.hook_z")]
    acts = run_at_last(model, inputs, names, extra)
    readout = FrozenReadout(model, acts[f"blocks.{n - 1}.hook_resid_post"], target, dtype=dtype)
    x = stack_layers(acts, "blocks.{}.hook_resid_pre", n)  # [batch, layer, d_model]
    head_scores = readout.score(x[:, :, None], head_vectors(model, stack_layers(acts, "blocks.{}.attn.hook_z", n)))
    chosen = _choose_heads(head_scores, heads, n_heads)  # per row: a list of (layer, head)
    # Several heads' position scores add up before normalising.
    total = sum(_slot_scores(model, acts, x, readout, cells, [row[s] for row in chosen]) for s in range(len(chosen[0])))
    _warn_below_noise(total, readout.dtype)
    return _normalise(total).reshape(len(inputs), inputs.grid_size, inputs.grid_size)


def _attention_map(model: HookedLlava, inputs: LlavaInputs) -> Tensor:
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    acts = run_at_last(model, inputs, [], dict.fromkeys(names, last_query(inputs)))
    mean = torch.stack([acts[name] for name in names]).float().mean(dim=(0, 2))  # [batch, key]
    return to_grid(inputs, mean)


def _occlusion_map(
    model: HookedLlava,
    inputs: LlavaInputs,
    target: Target,
    baseline: Baseline,
    batch_size: int,
    progress: bool,
    dtype: torch.dtype | None,
) -> Tensor:
    cells = grid_positions(inputs)  # [batch, cell]
    rows = torch.arange(len(inputs), device=cells.device).repeat_interleave(cells.shape[1])
    masks = torch.zeros(len(rows), inputs.input_ids.shape[1], dtype=torch.bool, device=cells.device)
    masks[torch.arange(len(rows)), cells.flatten()] = True
    occluded, clean = occluded_log_probs(model, inputs, rows, masks, baseline, target, batch_size, progress, dtype)
    return (clean[rows] - occluded).reshape(len(inputs), inputs.grid_size, inputs.grid_size)


@torch.no_grad()
def patch_importance(
    model: HookedLlava,
    inputs: LlavaInputs,
    method: Method = "log_prob_increase",
    heads: Sequence[tuple[int, int]] | None = None,
    n_top_heads: int = 1,
    target: Target = None,
    baseline: Baseline = "mean",
    batch_size: int = 16,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> Float[Tensor, "batch grid_h grid_w"]:
    """Importance of each image patch for the answer, on the patch grid (row-major).

    Args:
        model: the model.
        inputs: the prepared batch, one image per row.
        method: "log_prob_increase" (study A's tool: one forward pass; non-negative, sums to 1
            per row), "attention" (mean attention from the last position over all heads and
            layers), or "occlusion" (drop in `log P(answer)` when the patch's embedding is
            replaced by `baseline`; one forward per patch, batched).
        heads: for "log_prob_increase", `(layer, head)` pairs to use for every row; default the
            `n_top_heads` top heads of each row by head score. Several heads' scores are summed
            before normalising.
        n_top_heads: how many top heads to use when `heads` is None.
        target: the answer token (default: the model's top-1 prediction at the last position).
        baseline: occlusion's replacement: "mean" (the row's mean image feature), "zeros", or a vector.
        batch_size, progress: occlusion's forward batch size and tqdm bar.
        dtype: precision of the readouts of "log_prob_increase" and "occlusion" (see
            `FrozenReadout`): default `torch.float64` (as the report reads out; the map comes back
            at the model's precision, at least float32), which resolves score differences far
            below float32's ~1e-5 nats (e.g. on confident answers). With a
            coarser dtype, a row whose "log_prob_increase" scores span less than its rounding noise
            gets a warning: its min-max normalised map would show noise.

    Returns:
        `[batch, grid_h, grid_w]`, in `dtype` when given, else the model's (at least float32);
        larger means more important.

    Example:
        >>> heat = patch_importance(model, inputs, "log_prob_increase")
        >>> heat[0].sum()  # tensor(1.)
    """
    # Read out in float64 by default; return at the model's precision (at least float32), as before.
    given, dtype = dtype, torch.float64 if dtype is None else dtype
    out = torch.promote_types(model.W_U.dtype, torch.float32) if given is None else dtype
    if method == "log_prob_increase":
        return _lpi_map(model, inputs, heads, n_top_heads, target, dtype).to(out)
    if method == "attention":
        return _attention_map(model, inputs)
    if method == "occlusion":
        return _occlusion_map(model, inputs, target, baseline, batch_size, progress, dtype).to(out)
    raise ValueError(f"unknown method {method!r}; use 'log_prob_increase', 'attention' or 'occlusion'.")
