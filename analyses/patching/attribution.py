"""Attribution patching: `(clean - corrupted) · ∂metric/∂activation` at the corrupted run, from one
forward and one backward pass, estimating the activation-patching sweeps of `analyses.patching.activation`.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from analyses.patching.common import ACTIVATIONS, Clean, Metric, _clean_cache, image_blocks
from hooked_llava import HookedLlava, LlavaInputs


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
