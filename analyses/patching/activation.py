"""Image-aware activation patching and attribution patching between a clean and a corrupted batch.

A typical pair is two scenes that differ in one object's colour, asked the same question
(`corrupted = clean.with_pixels(other_pixels)`); both need the same layout (length, padding,
image positions). Activation patching (`patch_residual`, `patch_attn_out`, `patch_heads`,
`patch_groups`, `patch_image_blocks`) is one routine, `generic_patch`, specialised with
`functools.partial` as in TransformerLens' `patching.py`; here the pieces of one layer run
together as batch rows, from the cached corrupted residual before that layer.
`transformer_lens.patching` itself also works on these inputs (`LlavaInputs` has `.shape`).
Attribution patching (`attribute_*`) estimates the same sweeps from one forward and one
backward pass: `(clean - corrupted) · ∂metric/∂activation` at the corrupted run.
Shared pieces live in `analyses.patching.common`, attribution patching in `analyses.patching.attribution`;
both are importable from here.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analyses import ranges
from analyses.patching.attribution import (
    attribute_attn_out,
    attribute_heads,
    attribute_image_blocks,
    attribute_residual,
    generic_attribution,
)
from analyses.patching.common import (
    ACTIVATIONS,
    Clean,
    Metric,
    Positions,
    _clean_cache,
    check_pair,
    image_blocks,
    to_frame,
)
from hooked_llava import HookedLlava, LlavaInputs

__all__ = [
    "ACTIVATIONS", "Clean", "Metric", "Positions", "attribute_attn_out", "attribute_heads", "attribute_image_blocks",
    "attribute_residual", "check_pair", "generic_attribution", "generic_patch", "image_blocks", "patch_attn_out",
    "patch_groups", "patch_heads", "patch_image_blocks", "patch_residual", "to_frame",
]  # fmt: skip


# --- setters `(act, index, clean) -> act`: edit one copy `[batch, ...]` of the corrupted activation -------------------
def _set_position(act: Tensor, index: int, clean: Tensor) -> Tensor:
    act[:, index] = clean[:, index]
    return act


def _set_head(act: Tensor, index: int, clean: Tensor) -> Tensor:
    act[:, :, index] = clean[:, :, index]
    return act


def _set_group(act: Tensor, index: int, clean: Tensor, masks: list[Tensor]) -> Tensor:
    mask = masks[index].to(act.device)
    act[mask] = clean[mask]
    return act


def _patch_copies(act: Tensor, hook: Any, setter: Callable, indices: list[int], clean: Tensor) -> Tensor:
    """Hook on a batch of `len(indices)` copies of the corrupted inputs: copy i gets piece `indices[i]`."""
    act, clean = act.unflatten(0, (len(indices), -1)).clone(), clean.to(act.device, act.dtype)
    for i, index in enumerate(indices):
        act[i] = setter(act[i], index, clean)
    return act.flatten(0, 1)


def _sweep(model: HookedLlava, axis: str, size: int | None, inputs: LlavaInputs, positions: Positions | None
           ) -> tuple[list[int], int]:  # fmt: skip
    """The indices to sweep and the length of the index axis."""
    if axis == "pos":
        if positions is None:
            keep = torch.ones(inputs.shape[1], dtype=torch.bool)
        else:
            keep = inputs.as_mask(ranges.positions(inputs, positions)).any(0)
        return keep.nonzero()[:, 0].tolist(), inputs.shape[1]
    if positions is not None:
        raise ValueError(f"positions only restricts position sweeps, not a sweep over {axis}s.")
    n = model.cfg.n_heads if axis == "head" else size or 0
    return list(range(n)), n


def generic_patch(
    model: HookedLlava,
    corrupted: LlavaInputs,
    clean: Clean,
    metric: Metric,
    *,
    activation: str,
    setter: Callable,
    axis: str,
    size: int | None = None,
    layers: Sequence[int] | None = None,
    positions: Positions | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> Float[Tensor, "n_layers n_index *metric"]:
    """Patch each piece (layer × index) of an activation from the clean run into the corrupted run.

    Args:
        model: the model.
        corrupted: the batch that is run.
        clean: the clean batch (same layout), or an ActivationCache of its run.
        metric: logits `[batch, pos, d_vocab]` → a scalar or any tensor (its shape is kept).
        activation: a key of `ACTIVATIONS` ("resid_pre", "attn_out", "z", ...).
        setter: `(act[batch, ...], index, clean_act) → act`, copying one piece.
        axis: what the index counts: "pos", "head" or "group" (then `size` groups).
        layers: layers to sweep (default all); positions: positions to sweep on a "pos" axis,
            a role or explicit positions (default all). Pieces not swept are NaN. Negative
            layers count from the end, negative positions from each row's last real token (see
            `analyses.ranges.positions`); out-of-range ones raise.
        batch_size: pieces per forward pass (as batch rows).
        progress: show a tqdm bar.

    Returns:
        `[n_layers, n_index, *metric_shape]`: the metric with each piece patched.

    Example:
        >>> generic_patch(model, corrupted, clean, metric, activation="mlp_out", setter=_set_position, axis="pos")
    """
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else ranges.indices(layers, n_layers, "layer")
    batch_size = ranges.count(batch_size, "batch_size")
    (sweep, n_index), name = _sweep(model, axis, size, corrupted, positions), ACTIVATIONS[activation]
    if not sweep or not layers:
        raise ValueError("nothing to patch: the layers or positions selected are empty.")
    clean_cache = _clean_cache(model, clean, corrupted, [f"blocks.{layer}.{name}" for layer in layers])
    with torch.no_grad():
        starts = [f"blocks.{layer}.hook_resid_pre" for layer in layers]
        resid = model.run_with_cache(corrupted, names_filter=starts, return_type=None)[1]
    results: dict[tuple[int, int], Tensor] = {}
    jobs = [(layer, sweep[i : i + batch_size]) for layer in layers for i in range(0, len(sweep), batch_size)]
    for layer, indices in tqdm(jobs, disable=not progress, desc=f"patching {activation}"):
        hook_name = f"blocks.{layer}.{name}"
        hook = partial(_patch_copies, setter=setter, indices=indices, clean=clean_cache[hook_name])
        rows = corrupted[list(range(len(corrupted))) * len(indices)]
        x = resid[f"blocks.{layer}.hook_resid_pre"].repeat(len(indices), 1, 1)
        with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, hook)]):
            logits = model(rows, start_at_layer=layer, residual=x)
        copies = logits.split(len(corrupted))
        results.update({(layer, i): torch.as_tensor(metric(c)) for i, c in zip(indices, copies, strict=True)})
    return _fill(results, (model.cfg.n_layers, n_index))


def _fill(results: Mapping[tuple[int, int], Tensor], shape: tuple[int, int]) -> Tensor:
    """A tensor of `shape + metric_shape`, NaN where nothing was computed."""
    first = next(iter(results.values()))
    out = torch.full((*shape, *first.shape), float("nan"), dtype=torch.float32, device=first.device)
    for index, value in results.items():
        out[index] = value.float()
    return out


patch_residual = partial(generic_patch, activation="resid_pre", setter=_set_position, axis="pos")
patch_residual.__doc__ = """Patch `resid_pre` per (layer, position) → `[n_layers, pos, *metric]` (see `generic_patch`).

    Example:
        >>> red = model.to_single_token("red")
        >>> out = patch_residual(model, corrupted, clean, lambda lg: lg[:, -1, red].mean(), positions="image")
    """
patch_attn_out = partial(generic_patch, activation="attn_out", setter=_set_position, axis="pos")
patch_attn_out.__doc__ = """Patch `attn_out` per (layer, position) → `[n_layers, pos, *metric]` (see `generic_patch`).

    Example:
        >>> out = patch_attn_out(model, corrupted, clean, metric)"""
patch_heads = partial(generic_patch, activation="z", setter=_set_head, axis="head")
patch_heads.__doc__ = """Patch each head's `z` at all positions → `[n_layers, n_heads, *metric]` (see `generic_patch`).

    Example:
        >>> out = patch_heads(model, corrupted, clean, metric)"""


def patch_groups(
    model: HookedLlava,
    corrupted: LlavaInputs,
    clean: Clean,
    metric: Metric,
    groups: Mapping[str, Positions],
    activation: str = "resid_pre",
    **kwargs: Any,
) -> Float[Tensor, "n_layers n_groups *metric"]:
    """Patch groups of positions together (each a role, explicit positions or a `[batch, pos]` mask).

    Returns:
        `[n_layers, len(groups), *metric]`, groups in the mapping's order.

    Example:
        >>> out = patch_groups(model, corrupted, clean, metric, {"image": "image", "question": "question"})
    """
    masks = [corrupted.as_mask(ranges.positions(corrupted, g)) for g in groups.values()]
    setter = partial(_set_group, masks=masks)
    return generic_patch(
        model, corrupted, clean, metric, activation=activation, setter=setter, axis="group", size=len(masks), **kwargs
    )


def patch_image_blocks(
    model: HookedLlava, corrupted: LlavaInputs, clean: Clean, metric: Metric, size: int = 2, **kwargs: Any
) -> Float[Tensor, "n_layers n_blocks *metric"]:
    """Patch `size`×`size` blocks of image patches (`image_blocks` order) → `[n_layers, n_blocks, *metric]`.

    Example:
        >>> out = patch_image_blocks(model, corrupted, clean, metric, size=2)
    """
    return patch_groups(model, corrupted, clean, metric, image_blocks(corrupted, size), **kwargs)
