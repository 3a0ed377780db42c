"""Section 2 solutions — where the answer forms: the logit lens and direct logit attribution of heads."""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs


def residual_at(model: HookedLlava, cache: ActivationCache, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """Readout `layer` of the lens: `resid_pre` of that layer, or the final `resid_post` for `layer == n_layers`."""
    n = model.cfg.n_layers
    return cache[f"blocks.{n - 1}.hook_resid_post"] if layer == n else cache[f"blocks.{layer}.hook_resid_pre"]


def logit_lens(
    model: HookedLlava, cache: ActivationCache, layer: int, positions: Int[Tensor, " n_pos"]
) -> Float[Tensor, "n_pos d_vocab"]:
    """Row 0's residual at readout `layer` and `positions`, read through the final norm and the unembedding."""
    resid = residual_at(model, cache, layer)[:1, positions]  # [1, n_pos, d_model]: the norm takes batch and pos
    return model.unembed(model.ln_final(resid))[0]


def answer_ranks(
    model: HookedLlava, cache: ActivationCache, token: int, positions: Int[Tensor, " n_pos"]
) -> Int[Tensor, "layer n_pos"]:
    """The lens rank of `token` (0 = top) at every readout `0..n_layers` and every position."""
    ranks = []
    for layer in range(model.cfg.n_layers + 1):
        logits = logit_lens(model, cache, layer, positions)
        ranks.append((logits > logits[:, token : token + 1]).sum(-1))
    return torch.stack(ranks)


def head_results(model: HookedLlava, cache: ActivationCache, layer: int) -> Float[Tensor, "batch pos head d_model"]:
    """What each head of `layer` writes to the residual stream: its `z` times its slice of `W_O`."""
    return torch.einsum("bphd,hdm->bphm", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])


def head_dla(
    model: HookedLlava, cache: ActivationCache, inputs: LlavaInputs, token_a: int, token_b: int
) -> Float[Tensor, "layer head"]:
    """Each head's direct contribution to `logit[a] - logit[b]` at row 0's last position.

    A head's output at the last position is divided by the final norm's scale (cached on this
    run, so frozen) and projected on `g ⊙ (W_U[:, a] − W_U[:, b])`.
    """
    last = int(inputs.last[0])
    direction = model.ln_final.w * (model.W_U[:, token_a] - model.W_U[:, token_b])  # [d_model]
    scale = cache["ln_final.hook_scale"][0, last]  # [1]
    results = torch.stack([head_results(model, cache, layer)[0, last] for layer in range(model.cfg.n_layers)])
    return (results / scale) @ direction
