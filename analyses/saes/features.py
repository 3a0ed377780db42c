"""SAE feature analyses on a `HookedSAELlava` (SAELens SAEs spliced in with `hooked_llava.saes.splice`).

- `feature_acts`: every feature's activation at every position (the SAE spliced in with its error
  term, so the model computes exactly what it computes without it);
- `feature_patch_map`: one feature's activation over the image patches, on the patch grid;
- `top_activations`: a feature's top-activating image patches and text tokens over a dataset;
- `edit_features`: ablate (set to 0) or steer (set to a value) features at chosen positions, and
  the effect on the answer;
- `feature_attribution`: attribution patching through the latents, activation × gradient of a
  metric, per feature.

All run the SAE with its error term and leave the model with the SAEs it had before. Draw a patch
map over the image with `analyses.plotting.figures.plot_patch_heatmap(inputs, feature_patch_map(...))`; the
ground-truth score of features lives in `analyses.saes.groundtruth`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.patch_maps.grid import to_grid
from hooked_llava.inputs.llava_inputs import LlavaInputs

Metric = Callable[[Tensor, LlavaInputs], Tensor]  # (logits, inputs) -> [batch]


def _acts_name(sae: Any) -> str:
    return f"{sae.cfg.metadata.hook_name}.hook_sae_acts_post"


def _feature(feature: int, sae: Any) -> int:
    if not 0 <= feature < sae.cfg.d_sae:
        raise IndexError(
            f"feature {feature} is out of range: the SAE has {sae.cfg.d_sae} features (0..{sae.cfg.d_sae - 1})."
        )
    return feature


@torch.no_grad()
def feature_acts(model: Any, sae: Any, inputs: LlavaInputs) -> Float[Tensor, "batch pos d_sae"]:
    """All feature activations at the SAE's hook, with the forward left exact (error term on)."""
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True, names_filter=[_acts_name(sae)])
    return cache[_acts_name(sae)]


def feature_patch_map(model: Any, sae: Any, inputs: LlavaInputs, feature: int) -> Float[Tensor, "batch grid grid"]:
    """One feature's activation at each image patch, row-major on the patch grid (one image per row)."""
    acts = feature_acts(model, sae, inputs)[..., _feature(feature, sae)]
    return to_grid(inputs, acts)


def answer_log_prob(answer_ids: Int[Tensor, " batch"]) -> Metric:
    """A metric: the log-probability of each row's answer token at its last position."""

    def metric(logits: Tensor, inputs: LlavaInputs) -> Tensor:
        last = logits[torch.arange(len(inputs)), inputs.last].log_softmax(-1)
        return last.gather(-1, answer_ids.to(last.device)[:, None])[:, 0]

    return metric


def top_activations(
    model: Any, sae: Any, examples: Sequence[Any], feature: int, k: int = 20, batch_size: int = 32
) -> pd.DataFrame:
    """The `k` highest activations of a feature over the examples' positions, one row each.

    Columns: example, position, role ("image"/"text"), token (text) or row/col (patch grid), activation.
    """
    _feature(feature, sae)
    rows = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = model.prepare(images=[e.image for e in chunk], prompts=[e.prompt for e in chunk])
        acts = feature_acts(model, sae, inputs)[..., feature]
        rc, image = inputs.patch_rc().cpu(), inputs.image_mask.cpu()
        acts = acts.masked_fill(~inputs.attention_mask.bool().to(acts.device), float("-inf")).cpu()
        vals, flat = acts.flatten().topk(min(k, acts.numel()))
        for v, f in zip(vals.tolist(), flat.tolist()):
            b, p = divmod(f, acts.shape[1])
            is_image = bool(image[b, p])
            rows.append(
                dict(
                    example=start + b,
                    position=p,
                    role="image" if is_image else "text",
                    token=None if is_image else model.to_single_str_token(int(inputs.input_ids[b, p])),
                    row=int(rc[b, p, 0]) if is_image else -1,
                    col=int(rc[b, p, 1]) if is_image else -1,
                    activation=v,
                )
            )
    table = pd.DataFrame(rows)
    return table.sort_values("activation", ascending=False).head(k).reset_index(drop=True)


def _position_mask(inputs: LlavaInputs, positions: str | Sequence[int] | Tensor) -> Tensor:
    return inputs.as_mask(positions if isinstance(positions, (str, Tensor)) else list(positions))


def edit_features(
    model: Any,
    sae: Any,
    inputs: LlavaInputs,
    features: Sequence[int],
    metric: Metric,
    positions: str | Sequence[int] | Tensor = "image",
    value: float | Sequence[float] = 0.0,
) -> pd.DataFrame:
    """Set `features` to `value` at `positions` (0: ablation; a large value: steering), error term on.

    `value` is one number for all features or one per feature (e.g. ablate some, steer others at once).
    Returns one row per batch row: the metric and the arg-max answer token before and after.
    """
    feats = [_feature(f, sae) for f in features]
    values = [float(value)] * len(feats) if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != len(feats):
        raise ValueError(f"got {len(values)} values for {len(feats)} features: give one value, or one per feature.")
    mask = _position_mask(inputs, positions)

    def edit(acts: Tensor, hook: Any) -> Tensor:
        target = torch.tensor(values, device=acts.device, dtype=acts.dtype)
        edited = acts.clone()
        edited[..., feats] = target.expand(*acts.shape[:-1], -1)
        return torch.where(mask.to(acts.device)[..., None], edited, acts)

    with torch.no_grad():
        before = model.run_with_saes(inputs, saes=[sae], use_error_term=True)
        after = model.run_with_hooks_with_saes(
            inputs, saes=[sae], use_error_term=True, fwd_hooks=[(_acts_name(sae), edit)]
        )
    rows = torch.arange(len(inputs))
    top = lambda logits: model.to_str_tokens(logits[rows, inputs.last].argmax(-1).cpu())
    return pd.DataFrame(
        dict(
            row=rows.tolist(),
            metric_before=metric(before, inputs).tolist(),
            metric_after=metric(after, inputs).tolist(),
            top_before=top(before),
            top_after=top(after),
        )
    ).assign(change=lambda d: d.metric_after - d.metric_before)


def feature_attribution(
    model: Any, sae: Any, inputs: LlavaInputs, metric: Metric, positions: str | Sequence[int] | Tensor = "image"
) -> Float[Tensor, "batch d_sae"]:
    """Attribution patching through the latents: Σ over `positions` of activation × ∂metric/∂activation.

    The linear estimate of each feature's zero-ablation effect on the metric (ablating it changes the
    metric by about minus this), per batch row.
    """
    mask = _position_mask(inputs, positions)
    saved: dict[str, Tensor] = {}

    def keep(acts: Tensor, hook: Any) -> Tensor:
        acts.retain_grad()
        saved["acts"] = acts
        return acts

    with torch.enable_grad():
        logits = model.run_with_hooks_with_saes(
            inputs, saes=[sae], use_error_term=True, fwd_hooks=[(_acts_name(sae), keep)]
        )
        metric(logits, inputs).sum().backward()
    acts = saved["acts"]
    model.zero_grad(set_to_none=True)
    sae.zero_grad(set_to_none=True)
    return ((acts * acts.grad) * mask.to(acts.device)[..., None]).sum(1).detach()
