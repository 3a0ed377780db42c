"""Which image patches matter for the answer: three maps on the patch grid, and their faithfulness.

- "log_prob_increase": study A's one-pass tool. The top head(s) by log-probability increase,
  then the per-position scores inside them at the image positions, min-max normalised and
  divided by their sum, reshaped row-major to the patch grid.
- "attention": study A's baseline, the mean attention from the last position to each image
  position over all heads of all layers.
- "occlusion": the slow causal reference. Each patch's merged embedding (`hook_embed`) is
  replaced by a baseline vector in turn; the score is the drop in the answer's log-probability.

`faithfulness` occludes each map's top-k patches together and reports how much the answer
probability drops, the quantitative comparison study A left open. Positions map to the grid
through `inputs.patch_rc()`; no offsets are hard-coded. Every row must hold exactly one image.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from hooked_llava import HookedLlava, LlavaInputs

from . import ranges
from .attribution import (
    FrozenReadout,
    Target,
    head_vectors,
    last_query,
    position_vectors,
    resolve_targets,
    run_at_last,
    stack_layers,
)
from .logit_lens import read_out

Method = Literal["log_prob_increase", "attention", "occlusion"]
Baseline = Literal["mean", "zeros"] | Tensor


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
            "patches per row. For LLaVA-NeXT tiles use analyses.anyres (token_importance, anyres_maps, "
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


def _normalise(scores: Float[Tensor, "batch cell"]) -> Float[Tensor, "batch cell"]:
    """Min-max normalise, then divide by the sum (a constant row becomes uniform)."""
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    spread = (scores - low) / (high - low).clamp_min(torch.finfo(scores.dtype).tiny)
    spread = torch.where(high > low, spread, torch.ones_like(spread))
    return spread / spread.sum(1, keepdim=True)


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
    return _normalise(total).reshape(len(inputs), inputs.grid_size, inputs.grid_size)


def _attention_map(model: HookedLlava, inputs: LlavaInputs) -> Tensor:
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    acts = run_at_last(model, inputs, [], dict.fromkeys(names, last_query(inputs)))
    mean = torch.stack([acts[name] for name in names]).float().mean(dim=(0, 2))  # [batch, key]
    return to_grid(inputs, mean)


def _baselines(inputs: LlavaInputs, embeds: Tensor, baseline: Baseline) -> Float[Tensor, "batch d_model"]:
    if isinstance(baseline, Tensor):
        return baseline.to(embeds).expand(len(inputs), -1)
    if baseline == "zeros":
        return embeds.new_zeros(len(inputs), embeds.shape[-1])
    if baseline == "mean":  # each row's own mean projected image feature
        mask = inputs.image_mask[..., None].to(embeds)
        return (embeds * mask).sum(1) / mask.sum(1)
    raise ValueError(f"baseline must be 'mean', 'zeros' or a [d_model] tensor, got {baseline!r}.")


def _last_log_probs(
    model: HookedLlava, inputs: LlavaInputs, x: Tensor, y: Tensor | None, target: Target, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """`log P(y)` at each row's last position, running the blocks from the layer-0 residual `x`; the
    log-softmax in `dtype` (default: the model's precision, at least float32)."""
    resid = model(inputs, start_at_layer=0, residual=x, stop_at_layer=model.cfg.n_layers)
    last = inputs.last.to(resid.device)
    logits = read_out(model, resid[torch.arange(len(inputs), device=resid.device), last])
    dtype = torch.promote_types(logits.dtype, torch.float32) if dtype is None else dtype
    log_probs = logits.to(dtype).log_softmax(-1)
    y = resolve_targets(model, target, log_probs) if y is None else y
    return log_probs.gather(1, y[:, None])[:, 0], y


@torch.no_grad()
def occluded_log_probs(
    model: HookedLlava,
    inputs: LlavaInputs,
    rows: Int[Tensor, " job"],
    masks: Bool[Tensor, "job pos"],
    baseline: Baseline = "mean",
    target: Target = None,
    batch_size: int = 16,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> tuple[Float[Tensor, " job"], Float[Tensor, " batch"]]:
    """Answer log-probabilities with the embeddings at `masks[j]` of row `rows[j]` replaced.

    Jobs run `batch_size` at a time as batch rows, starting at layer 0 from the merged
    embeddings, which are computed once (the vision tower runs once).

    Args:
        model, inputs: the model and the prepared batch.
        rows: the batch row of each job.
        masks: the positions each job replaces.
        baseline: "mean" (the row's mean projected image feature), "zeros", or a `[d_model]` vector.
        target: the answer token (default: the model's top-1 prediction on the clean input).
        batch_size, progress: jobs per forward pass; show a tqdm bar.
        dtype: precision of the log-softmax (default: the model's, at least float32).

    Returns:
        `(occluded, clean)`: `log P(y)` at the last position for each job, and for each clean row.

    Example:
        >>> occluded, clean = occluded_log_probs(model, inputs, torch.tensor([0]), inputs.mask("image")[:1])
    """
    inputs = model.as_inputs(inputs)  # validated and on the model's device, as `embed_inputs` needs
    embeds = model.embed_inputs(inputs)
    base = _baselines(inputs, embeds, baseline)
    clean, y = _last_log_probs(model, inputs, embeds, None, target, dtype)
    out, batch_size = [clean.new_zeros(0)], ranges.count(batch_size, "batch_size")
    for s in tqdm(range(0, len(rows), batch_size), desc="occlusion", disable=not progress):
        r, m = rows[s : s + batch_size].to(embeds.device), masks[s : s + batch_size, :, None].to(embeds.device)
        x = torch.where(m, base[r][:, None], embeds[r])
        chunk = inputs[rows[s : s + batch_size]]
        out.append(_last_log_probs(model, chunk, x, y[r], None, dtype)[0])
    return torch.cat(out), clean


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
            `FrozenReadout`): default the model's, at least float32; `torch.float64` resolves
            score differences below float32's ~1e-5 nats (e.g. on confident answers).

    Returns:
        `[batch, grid_h, grid_w]`, in the readout's dtype; larger means more important.

    Example:
        >>> heat = patch_importance(model, inputs, "log_prob_increase")
        >>> heat[0].sum()  # tensor(1.)
    """
    if method == "log_prob_increase":
        return _lpi_map(model, inputs, heads, n_top_heads, target, dtype)
    if method == "attention":
        return _attention_map(model, inputs)
    if method == "occlusion":
        return _occlusion_map(model, inputs, target, baseline, batch_size, progress, dtype)
    raise ValueError(f"unknown method {method!r}; use 'log_prob_increase', 'attention' or 'occlusion'.")


@torch.no_grad()
def faithfulness(
    model: HookedLlava,
    inputs: LlavaInputs,
    maps: Mapping[str, Float[Tensor, "batch grid_h grid_w"]],
    k: int | Sequence[int] = (1, 4, 16),
    baseline: Baseline = "mean",
    target: Target = None,
    random_control: bool = True,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    dtype: torch.dtype | None = None,
) -> pd.DataFrame:
    """How much the answer probability drops when each map's top-k patches are occluded together.

    Args:
        model, inputs: the model and the prepared batch (one image per row).
        maps: method name → `[batch, grid_h, grid_w]` map (e.g. from `patch_importance`).
        k: number(s) of top patches to occlude, each in `1..n_patches`.
        baseline, target, batch_size, progress, dtype: as in `patch_importance(method="occlusion")`.
        random_control: add a "random" method occluding k patches drawn at random (one draw
            per row, shared across the values of k).
        seed: seed of the random control.

    Returns:
        Columns `method, k, batch, p_clean, p_occluded, prob_drop` (`p_clean − p_occluded`) and
        `relative_change` (`(p_occluded − p_clean) / p_clean × 100`, study B's metric).

    Example:
        >>> maps = {m: patch_importance(model, inputs, m) for m in ("log_prob_increase", "attention")}
        >>> faithfulness(model, inputs, maps, k=[1, 4]).groupby(["method", "k"])["prob_drop"].mean()
    """
    cells = grid_positions(inputs)
    ks = [ranges.count(kk, "k", 1, cells.shape[1]) for kk in ([k] if isinstance(k, int) else k)]
    ranked = {name: m.flatten(1).to(cells.device).argsort(dim=1, descending=True) for name, m in maps.items()}
    if random_control:
        gen = torch.Generator().manual_seed(seed)
        ranked["random"] = torch.stack([torch.randperm(cells.shape[1], generator=gen) for _ in range(len(inputs))]).to(
            cells.device
        )
    jobs = [(name, kk, b) for name in ranked for kk in ks for b in range(len(inputs))]
    masks = torch.zeros(len(jobs), inputs.input_ids.shape[1], dtype=torch.bool, device=cells.device)
    for j, (name, kk, b) in enumerate(jobs):
        masks[j, cells[b, ranked[name][b, :kk]]] = True
    rows = torch.tensor([b for _, _, b in jobs], dtype=torch.long, device=cells.device)
    occluded, clean = occluded_log_probs(model, inputs, rows, masks, baseline, target, batch_size, progress, dtype)
    p_clean, p_occ = clean.exp()[rows].cpu(), occluded.exp().cpu()
    frame = pd.DataFrame(jobs, columns=["method", "k", "batch"])
    frame["p_clean"], frame["p_occluded"] = p_clean.numpy(), p_occ.numpy()
    frame["prob_drop"] = (p_clean - p_occ).numpy()
    frame["relative_change"] = ((p_occ - p_clean) / p_clean * 100).numpy()
    return frame
