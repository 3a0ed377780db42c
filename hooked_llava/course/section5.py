"""Section 5 solutions — activation patching, attribution patching and path patching across a colour swap."""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs

Metric = Callable[[Tensor], Tensor]


def patch_position_hook(
    resid: Float[Tensor, "batch pos d_model"], hook: Any, position: int, clean_cache: ActivationCache
):
    """A residual-stream hook that copies the clean run's activation at `position` into this run."""
    resid = resid.clone()
    resid[:, position] = clean_cache[hook.name][:, position]
    return resid


def patch_residual_scan(
    model: HookedLlava, corrupted: LlavaInputs, clean_cache: ActivationCache, metric: Metric,
    positions: Int[Tensor, " n_pos"],
) -> Float[Tensor, "layer n_pos"]:  # fmt: skip
    """The metric after patching clean `resid_pre` into the corrupted run, one (layer, position) at a time."""
    out = torch.zeros(model.cfg.n_layers, len(positions))
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for i, pos in enumerate(positions.tolist()):
                hook = partial(patch_position_hook, position=pos, clean_cache=clean_cache)
                logits = model.run_with_hooks(corrupted, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
                out[layer, i] = metric(logits)
    return out


def attribution_residual(
    model: HookedLlava, clean_cache: ActivationCache, corrupted: LlavaInputs, metric: Metric
) -> Float[Tensor, "layer pos"]:
    """Attribution patching: `(clean − corrupted) · ∂metric/∂resid_pre` at the corrupted run, per (layer, position)."""
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
    acts: dict[str, Tensor] = {}

    def keep(resid: Tensor, hook: Any) -> Tensor:
        acts[hook.name] = resid  # the very tensor the rest of the model uses, so gradients reach it
        return resid

    with torch.enable_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=[(name, keep) for name in names])
        grads = torch.autograd.grad(metric(logits), [acts[n] for n in names])
    per_layer = [((clean_cache[n] - acts[n].detach()) * g).sum(-1)[0] for n, g in zip(names, grads, strict=True)]
    return torch.stack(per_layer)


def path_patch_direct(
    model: HookedLlava, clean_cache: ActivationCache, corrupt_cache: ActivationCache, inputs: LlavaInputs,
    layer: int, head: int, positions: Int[Tensor, " n_pos"], token_a: int, token_b: int,
) -> float:  # fmt: skip
    """Path image `positions` → head (layer, head) values → logits, directly.

    The head reads clean values at `positions` (queries, keys, the pattern and every other input
    stay corrupted); the change of its output at row 0's last position goes straight to the logits
    through the corrupted run's final-norm scale. Returns the change of `logit[a] − logit[b]`.
    """
    last = int(inputs.last[0])
    name = f"blocks.{layer}.attn.hook_v"
    dv = clean_cache[name][0, positions, head] - corrupt_cache[name][0, positions, head]  # [n_pos, d_head]
    weights = corrupt_cache[f"blocks.{layer}.attn.hook_pattern"][0, head, last, positions]  # [n_pos]
    d_result = (weights @ dv) @ model.W_O[layer, head]  # [d_model]
    direction = model.ln_final.w * (model.W_U[:, token_a] - model.W_U[:, token_b])
    return float((d_result @ direction).detach() / corrupt_cache["ln_final.hook_scale"][0, last, 0])
