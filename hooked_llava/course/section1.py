"""Section 1 solutions — tokens and images: the merged sequence, image positions, hook names, caching."""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs


def image_positions(inputs: LlavaInputs) -> Int[Tensor, " n_image"]:
    """The positions of the `<image>` tokens in row 0, found from the token ids."""
    return (inputs.input_ids[0] == inputs.image_token_id).nonzero()[:, 0]


def patch_row_col(inputs: LlavaInputs, position: int) -> tuple[int, int]:
    """The (row, column) in the patch grid of image position `position` of row 0 (row-major order)."""
    first = int(image_positions(inputs)[0])
    row, col = divmod(position - first, inputs.grid_size)
    return row, col


def merged_embedding(
    model: HookedLlava, inputs: LlavaInputs, cache: ActivationCache
) -> Float[Tensor, "batch pos d_model"]:
    """The language model's input: token embeddings, with the projector's outputs at the image positions."""
    embedded = model.W_E[inputs.input_ids].clone()
    image = inputs.input_ids == inputs.image_token_id
    embedded[image] = cache["projector.hook_out"].reshape(-1, model.cfg.d_model)
    return embedded


def attention_pattern(cache: ActivationCache, layer: int) -> Float[Tensor, "batch head q k"]:
    """Layer `layer`'s attention pattern recomputed from the rotated queries and keys (causal, scaled)."""
    q, k = cache[f"blocks.{layer}.attn.hook_rot_q"], cache[f"blocks.{layer}.attn.hook_rot_k"]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def resid_pre_from_parts(cache: ActivationCache, layer: int) -> Float[Tensor, "batch pos d_model"]:
    """`resid_pre` of `layer` rebuilt as the embedding plus every earlier attention and MLP output."""
    resid = cache["hook_embed"].clone()
    for earlier in range(layer):
        resid = resid + cache[f"blocks.{earlier}.hook_attn_out"] + cache[f"blocks.{earlier}.hook_mlp_out"]
    return resid


def answer_probability(model: HookedLlava, inputs: LlavaInputs, answer: str) -> float:
    """The probability of the single-token `answer` as the next token after row 0's last position."""
    with torch.no_grad():
        logits = model(inputs)
    return float(logits[0, int(inputs.last[0])].softmax(-1)[model.to_single_token(answer)])
