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
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs

from . import ranges

Positions = str | Sequence[int] | Tensor
Metric = Callable[[Tensor], Tensor]
Clean = LlavaInputs | ActivationCache | Mapping[str, Tensor]
# Activation name → hook name inside block l.
ACTIVATIONS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "z": "attn.hook_z"}  # fmt: skip


def image_blocks(inputs: LlavaInputs, size: int = 2) -> dict[str, Bool[Tensor, "batch pos"]]:
    """Image positions grouped in `size`×`size` blocks of the patch grid, row-major, by label "r{i}c{j}".

    Example:
        >>> blocks = image_blocks(inputs, 2)  # a 4x4 grid gives 4 blocks: r0c0, r0c1, r1c0, r1c1
    """
    rc, size = inputs.patch_rc(), ranges.count(size, "size", 1, inputs.grid_size)
    n = -(-inputs.grid_size // size)
    return {
        f"r{i}c{j}": (rc[..., 0] // size == i) & (rc[..., 1] // size == j) & (rc[..., 0] >= 0)
        for i in range(n)
        for j in range(n)
    }


def check_pair(clean: LlavaInputs, corrupted: LlavaInputs) -> None:
    """Raise a ValueError unless both batches have the same length, padding and image positions.

    Example:
        >>> check_pair(clean, clean.with_pixels(other_pixels))  # passes: only the images differ
    """
    same = clean.shape == corrupted.shape and torch.equal(clean.attention_mask, corrupted.attention_mask)
    if not (same and torch.equal(clean.image_mask, corrupted.image_mask)):
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} inputs must have the same length, "
            "padding and image positions; use the same prompts, e.g. corrupted = clean.with_pixels(other_pixels)."
        )


def _clean_cache(
    model: HookedLlava, clean: Clean, corrupted: LlavaInputs, names: list[str]
) -> ActivationCache | Mapping[str, Tensor]:
    if not isinstance(clean, LlavaInputs):
        return clean  # an ActivationCache (or dict) of the clean run, as TransformerLens takes
    check_pair(clean, corrupted)
    with torch.no_grad():
        return model.run_with_cache(clean, names_filter=names, return_type=None)[1]


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
            layers and positions count from the end; out-of-range ones raise.
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


# --- attribution patching -------------------------------------------------------------------
def _keep(act: Tensor, hook: Any, store: dict[str, Tensor]) -> Tensor:
    store[hook.name] = act
    return act


def _leaf(x: Tensor, hook: Any) -> Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def generic_attribution(
    model: HookedLlava,
    corrupted: LlavaInputs,
    clean: Clean,
    metric: Metric,
    *,
    activation: str,
    reduce: Callable[[Tensor], Tensor],
) -> Float[Tensor, "n_layers n_index"]:
    """Attribution patching: `(clean - corrupted) · ∂metric/∂act` at the corrupted run, summed by `reduce`.

    Args:
        metric: logits → scalar (a tensor of values is summed).
        activation: a key of `ACTIVATIONS`.
        reduce: `[batch, pos, ...]` products, summed over the model dimension → `[n_index]`.

    Returns:
        `[n_layers, n_index]`, the estimated change of the metric (patched - corrupted) per piece.

    Example:
        >>> generic_attribution(model, corrupted, clean, metric, activation="mlp_out", reduce=lambda p: p.sum(0))
    """
    names = [f"blocks.{layer}.{ACTIVATIONS[activation]}" for layer in range(model.cfg.n_layers)]
    clean_cache = _clean_cache(model, clean, corrupted, names)
    store: dict[str, Tensor] = {}
    hooks = [("hook_embed", _leaf)] + [(name, partial(_keep, store=store)) for name in names]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        value = torch.as_tensor(metric(model(corrupted))).sum()
        grads = torch.autograd.grad(value, [store[name] for name in names])
    products = [((clean_cache[n].to(g) - store[n].detach()) * g).sum(-1) for n, g in zip(names, grads, strict=True)]
    return torch.stack([reduce(p) for p in products]).detach()


def _group_sum(products: Tensor, masks: list[Tensor]) -> Tensor:
    return torch.stack([products[m.to(products.device)].sum() for m in masks])


attribute_residual = partial(generic_attribution, activation="resid_pre", reduce=lambda p: p.sum(0))
attribute_residual.__doc__ = """Attribution of `resid_pre` per (layer, position) → `[n_layers, pos]`.

    Example:
        >>> est = attribute_residual(model, corrupted, clean, metric)  # ≈ patch_residual(...) - metric(corrupted)"""
attribute_attn_out = partial(generic_attribution, activation="attn_out", reduce=lambda p: p.sum(0))
attribute_attn_out.__doc__ = """Attribution of `attn_out` per (layer, position) → `[n_layers, pos]`.

    Example:
        >>> est = attribute_attn_out(model, corrupted, clean, metric)"""
attribute_heads = partial(generic_attribution, activation="z", reduce=lambda p: p.sum((0, 1)))
attribute_heads.__doc__ = """Attribution of each head's `z` at all positions → `[n_layers, n_heads]`.

    Example:
        >>> est = attribute_heads(model, corrupted, clean, metric)"""


def attribute_image_blocks(
    model: HookedLlava,
    corrupted: LlavaInputs,
    clean: Clean,
    metric: Metric,
    size: int = 2,
    activation: str = "resid_pre",
) -> Float[Tensor, "n_layers n_blocks"]:
    """Attribution of `size`×`size` image blocks (`image_blocks` order) → `[n_layers, n_blocks]`.

    Example:
        >>> est = attribute_image_blocks(model, corrupted, clean, metric, size=2)
    """
    masks = list(image_blocks(corrupted, size).values())
    return generic_attribution(
        model, corrupted, clean, metric, activation=activation, reduce=partial(_group_sum, masks=masks)
    )


def to_frame(
    result: Tensor, axis: str = "pos", inputs: LlavaInputs | None = None, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """A scalar-metric result `[n_layers, n_index]` as a tidy DataFrame: layer, `axis`, value (+ role, label).

    With `inputs` and a "pos" axis, `role` says what each position is in row 0 (image,
    question, template, last, pad) and `label` names image positions "img r{row}c{col}".

    Example:
        >>> to_frame(patch_residual(model, corrupted, clean, metric), "pos", corrupted)
    """
    n_layers, n_index = result.shape[:2]
    layer, index = (t.flatten().numpy() for t in torch.meshgrid(torch.arange(n_layers), torch.arange(n_index),
                                                                  indexing="ij"))  # fmt: skip
    df = pd.DataFrame({"layer": layer, axis: index, "value": result.reshape(n_layers * n_index).cpu().numpy()})
    if inputs is not None and axis == "pos":
        roles = ["pad"] * n_index
        for role in ("template", "question", "image", "last"):
            roles = [role if m else r for r, m in zip(roles, inputs.mask(role)[0].tolist(), strict=True)]
        rc = inputs.patch_rc()[0].tolist()
        df["role"] = roles * n_layers
        labels = [f"img r{r}c{c}" if r >= 0 else role for (r, c), role in zip(rc, roles, strict=True)]
    if labels is not None:
        df["label"] = list(labels) * n_layers
    return df
