"""Section 3 solutions — which heads read the image: attention to the object, study A's score, head ablation."""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs
from hooked_llava.course.section2 import head_results


def attention_to_object(cache: ActivationCache, inputs: LlavaInputs, n_layers: int) -> Float[Tensor, "layer head"]:
    """Attention from row 0's last position to the asked-about object's patches, summed over them."""
    last, related = int(inputs.last[0]), inputs.positions("related")[0]
    patterns = [cache[f"blocks.{layer}.attn.hook_pattern"][0, :, last, related] for layer in range(n_layers)]
    return torch.stack(patterns).sum(-1)


def log_prob_increase_heads(
    model: HookedLlava, cache: ActivationCache, inputs: LlavaInputs, target: int
) -> Float[Tensor, "layer head"]:
    """Study A's score of every head at row 0's last position: `log P(x + v)[y] − log P(x)[y]`.

    `x` is `resid_pre` of the head's layer, `v` the head's output, and `P(v) = softmax(W_U (g ⊙ v / s))`
    with `s = sqrt(mean(final_resid²) + ε)` fixed from the final residual at the last position.
    """
    n, last = model.cfg.n_layers, int(inputs.last[0])
    final = cache[f"blocks.{n - 1}.hook_resid_post"][0, last]
    scale = (final.pow(2).mean() + model.ln_final.eps).sqrt()

    def log_p(x: Tensor) -> Tensor:
        return ((model.ln_final.w * x / scale) @ model.W_U).log_softmax(-1)[..., target]

    scores = []
    for layer in range(n):
        x = cache[f"blocks.{layer}.hook_resid_pre"][0, last]  # [d_model]
        v = head_results(model, cache, layer)[0, last]  # [head, d_model]
        scores.append(log_p(x + v) - log_p(x))
    return torch.stack(scores)


def zero_head_hook(z: Float[Tensor, "batch pos head d_head"], hook: Any, head: int) -> Tensor:
    """A `hook_z` hook that zeroes one head's output everywhere (a new tensor: the cached one is untouched)."""
    z = z.clone()
    z[:, :, head] = 0.0
    return z


def ablation_drop(model: HookedLlava, inputs: LlavaInputs, layer: int, head: int, target: int, other: int) -> float:
    """How much `logit[target] − logit[other]` at row 0's last position falls when head (layer, head) is zero-ablated.

    A logit difference rather than `log P(target)`: the model is so sure of its answers that their
    log-probabilities saturate near 0 and hide what an ablation does.
    """
    last = int(inputs.last[0])
    hook = (f"blocks.{layer}.attn.hook_z", partial(zero_head_hook, head=head))
    with torch.no_grad():
        clean, ablated = model(inputs)[0, last], model.run_with_hooks(inputs, fwd_hooks=[hook])[0, last]
    return float((clean[target] - clean[other]) - (ablated[target] - ablated[other]))
