"""Section 4 solutions — information flow: study B's attention knockout, written as a hook."""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from hooked_llava import HookedLlava, LlavaInputs


def knockout_hook(
    scores: Float[Tensor, "batch head q k"], hook: Any, source: Bool[Tensor, "batch k"], target: Bool[Tensor, "batch q"]
) -> Float[Tensor, "batch head q k"]:
    """A `hook_attn_scores` hook: queries in `target` may not attend to keys in `source` (all heads).

    The study adds `finfo(dtype).min` rather than `-inf`, so no softmax row is ever all `-inf`; the
    scores already hold the causal mask (`finfo.min`), so the sum is clamped at `finfo.min`.
    """
    lowest = torch.finfo(scores.dtype).min
    blocked = (target[:, :, None] & source[:, None, :])[:, None]  # [batch, 1, q, k]
    return torch.where(blocked, (scores + lowest).clamp_min(lowest), scores)


def window_layers(layer: int, n_layers: int, window: int) -> list[int]:
    """The layers blocked for plotted `layer`: `window // 2` before it and the rest after, clipped."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2)))


def knockout_logits(
    model: HookedLlava, inputs: LlavaInputs, source: str, target: str, layers: list[int]
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the flow `source → target` (position roles) blocked in `layers`."""
    hook = partial(knockout_hook, source=inputs.mask(source), target=inputs.mask(target))
    with torch.no_grad():
        return model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{lay}.attn.hook_attn_scores", hook) for lay in layers])


def knockout_change(
    model: HookedLlava, inputs: LlavaInputs, source: str, target: str, window: int
) -> Float[Tensor, " layer"]:
    """Study B's curve for row 0: `(p_blocked − p_base) / p_base × 100` of the greedy answer, per plotted layer."""
    last = int(inputs.last[0])
    with torch.no_grad():
        base = model(inputs)[0, last].softmax(-1)
    answer = int(base.argmax())
    n = model.cfg.n_layers
    blocked = [
        knockout_logits(model, inputs, source, target, window_layers(layer, n, window))[0, last].softmax(-1)[answer]
        for layer in range(n)
    ]
    return (torch.stack(blocked) - base[answer]) / base[answer] * 100
