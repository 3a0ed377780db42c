"""Occlusion: the answer's log-probability with chosen image embeddings replaced, and the maps' faithfulness.

`occluded_log_probs` is the causal primitive (embeddings at chosen positions replaced by a
baseline vector, jobs batched); `faithfulness` occludes each patch map's top-k patches together
and reports how much the answer probability drops, the quantitative comparison study A left open.

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

from analyses import ranges
from analyses.attribution.contributions import Target, resolve_targets
from analyses.patch_maps.grid import grid_positions
from analyses.readout import read_out
from hooked_llava import HookedLlava, LlavaInputs

Baseline = Literal["mean", "zeros"] | Tensor


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
        >>> from analyses.patch_maps.maps import patch_importance
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
