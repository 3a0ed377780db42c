"""Study A's log-probability increase and direct logit attribution.

The log-probability increase scores a vector `v` added to a residual `x` at the last position:

    score(v | x) = log P(x + v)[y] − log P(x)[y],   P(v) = softmax(W_U (g ⊙ v / sqrt(σ² + ε)))

with `g` the final RMSNorm weight and `σ²` the mean square of the final-layer residual at the
last position, held fixed for every vector scored (METHODS.md §2). Units: attention and MLP
layers, heads, positions inside a head, and MLP neurons. Direct logit attribution splits a
logit difference into per-head / per-layer terms with the TransformerLens cache helpers.

The shared readout and unit vectors live in `analyses.attribution.contributions`.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache

from analyses import ranges
from analyses.attribution.contributions import (
    FrozenReadout,
    Target,
    _final_name,
    _last,
    head_vectors,
    last_query,
    position_vectors,
    resolve_targets,
    run_at_last,
    stack_layers,
)
from analyses.readout import at_positions, collect, read_out
from hooked_llava import HookedLlava, LlavaInputs

Unit = Literal["layer", "head", "position", "neuron"]


def _head_scores(model: HookedLlava, inputs: LlavaInputs, readout_args: dict) -> Tensor:
    n = model.cfg.n_layers
    acts = run_at_last(model, inputs, [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "attn.hook_z")])
    readout = FrozenReadout(model, acts[_final_name(model)], **readout_args)
    x = stack_layers(acts, "blocks.{}.hook_resid_pre", n)[:, :, None]  # [batch, layer, 1, d_model]
    return readout.score(x, head_vectors(model, stack_layers(acts, "blocks.{}.attn.hook_z", n)))


def _position_scores(model: HookedLlava, inputs: LlavaInputs, head: tuple[int, int], readout_args: dict) -> Tensor:
    layer, h = head
    extra = {f"blocks.{layer}.attn.hook_v": lambda a: a, f"blocks.{layer}.attn.hook_pattern": last_query(inputs)}
    acts = run_at_last(model, inputs, [f"blocks.{layer}.hook_resid_pre"], extra)
    readout = FrozenReadout(model, acts[_final_name(model)], **readout_args)
    vec = position_vectors(
        model, layer, h, acts[f"blocks.{layer}.attn.hook_pattern"], acts[f"blocks.{layer}.attn.hook_v"]
    )
    scores = readout.score(acts[f"blocks.{layer}.hook_resid_pre"][:, None], vec)
    # A padding key adds a zero vector, but `log P(x + 0) − log P(x)` is float noise; mask it to exactly 0.
    real = inputs.attention_mask.to(scores.device).bool()
    return scores.masked_fill(~real, 0.0)


def _layer_scores(model: HookedLlava, inputs: LlavaInputs, readout_args: dict) -> pd.DataFrame:
    n = model.cfg.n_layers
    parts = {"attn": ("hook_resid_pre", "hook_attn_out"), "mlp": ("hook_resid_mid", "hook_mlp_out")}
    acts = run_at_last(model, inputs, [f"blocks.{i}.{h}" for i in range(n) for pair in parts.values() for h in pair])
    readout = FrozenReadout(model, acts[_final_name(model)], **readout_args)
    scores = {c: readout.score(*(stack_layers(acts, "blocks.{}." + h, n) for h in pair)) for c, pair in parts.items()}
    records = [(b, i, c, float(s[b, i])) for b in range(len(inputs)) for i in range(n) for c, s in scores.items()]
    return pd.DataFrame.from_records(records, columns=["batch", "layer", "component", "score"])


def _neuron_scores(model: HookedLlava, inputs: LlavaInputs, readout_args: dict) -> Tensor:
    n = model.cfg.n_layers
    acts = run_at_last(
        model, inputs, [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_mid", "mlp.hook_post")]
    )
    readout = FrozenReadout(model, acts[_final_name(model)], **readout_args)
    scores, step = [], max(1, readout.chunk_size)
    for layer in range(n):
        x, m = acts[f"blocks.{layer}.hook_resid_mid"][:, None], acts[f"blocks.{layer}.mlp.hook_post"]
        x, m = x.to(readout.dtype), m.to(readout.dtype)
        W_out = model.blocks[layer].mlp.W_out.to(m.dtype)  # [d_mlp, d_model]
        # Vectors m_i W_out[i] are built a chunk of neurons at a time, never all at once.
        chunks = [
            readout.log_prob(x + m[:, s : s + step, None] * W_out[s : s + step]) for s in range(0, m.shape[1], step)
        ]
        scores.append(torch.cat(chunks, dim=1) - readout.log_prob(x))
    return torch.stack(scores, dim=1)


@torch.no_grad()
def log_prob_increase(
    model: HookedLlava,
    inputs: LlavaInputs,
    unit: Unit = "head",
    target: Target = None,
    head: tuple[int, int] | None = None,
    chunk_size: int = 1024,
    dtype: torch.dtype | None = None,
) -> Tensor | pd.DataFrame:
    """Study A's log-probability increase of model components at the last position.

    Args:
        model: the model.
        inputs: the prepared batch; scores are taken at each row's last real position.
        unit: "head" → `[batch, n_layers, n_heads]`; "position" → `[batch, pos]` for the
            key positions of `head` (zeros at padding); "layer" → DataFrame with columns
            `batch, layer, component` ("attn" | "mlp"), `score`; "neuron" → `[batch, n_layers, d_mlp]`.
        target: explained token: None (the model's top-1 prediction at the last position), a
            token id or single-token string for every row, or one per row.
        head: `(layer, head)` for `unit="position"`; negative indices count from the end,
            out-of-range ones raise.
        chunk_size: vectors per readout matrix product (bounds memory for neurons/positions).
        dtype: the readout's precision (see `FrozenReadout`): default the model's, at least
            float32; `torch.float64` resolves differences below ~1e-5 nats.

    Example:
        >>> scores = log_prob_increase(model, inputs, unit="head")
        >>> top_heads(scores, k=5)
    """
    args = {"target": target, "chunk_size": chunk_size, "dtype": dtype}
    if unit == "head":
        return _head_scores(model, inputs, args)
    if unit == "position":
        if head is None:
            raise ValueError("unit='position' scores the positions inside one head: pass head=(layer, head).")
        layer = ranges.index(head[0], model.cfg.n_layers, "layer")
        return _position_scores(model, inputs, (layer, ranges.index(head[1], model.cfg.n_heads, "head")), args)
    if unit == "layer":
        return _layer_scores(model, inputs, args)
    if unit == "neuron":
        return _neuron_scores(model, inputs, args)
    raise ValueError(f"unknown unit {unit!r}; use 'layer', 'head', 'position' or 'neuron'.")


def top_units(scores: Float[Tensor, "batch layer unit"], k: int = 10, kind: str = "head") -> pd.DataFrame:
    """The top-k heads (or neurons) of each row, named `"{layer}_{index}"` (e.g. `22_27`).

    `k` must be 1 or more; a `k` above the number of units gives them all.

    Returns:
        Columns `batch, rank` (1 = highest score), `name, layer, <kind>, score`.

    Example:
        >>> top_units(log_prob_increase(model, inputs, unit="neuron"), k=5, kind="neuron")
    """
    n_units, k = scores.shape[2], ranges.count(k, "k")
    values, flat = scores.flatten(1).topk(min(k, scores[0].numel()), dim=1)
    records = [
        (b, r + 1, f"{i // n_units}_{i % n_units}", i // n_units, i % n_units, float(values[b, r]))
        for b in range(scores.shape[0])
        for r, i in enumerate(flat[b].tolist())
    ]
    return pd.DataFrame.from_records(records, columns=["batch", "rank", "name", "layer", kind, "score"])


def top_heads(scores: Float[Tensor, "batch layer head"], k: int = 10) -> pd.DataFrame:
    """`top_units` for head scores (`unit="head"`).

    Example:
        >>> top_heads(log_prob_increase(model, inputs), k=5)["name"].tolist()  # e.g. ["2_1", ...]
    """
    return top_units(scores, k, kind="head")


def _dla_stack(model: HookedLlava, cache: ActivationCache, unit: str) -> tuple[Tensor, list[str]]:
    """Residual components at the last position with the final norm's cached scale applied."""
    if unit == "layer":
        stack, labels = cache.decompose_resid(layer=-1, apply_ln=True, return_labels=True)
        return stack, [label.removesuffix("_out") for label in labels]
    heads = cache.stack_head_results(layer=-1, apply_ln=True)  # layer-major, like these labels
    head_labels = [f"{layer}_{h}" for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    rest, rest_labels = cache.decompose_resid(layer=-1, mode="mlp", apply_ln=True, return_labels=True)
    stack, labels = torch.cat([rest[:1], heads, rest[1:]]), [rest_labels[0], *head_labels, *rest_labels[1:]]
    if any(block.attn.b_o is not None for block in model.blocks):  # attn_out = Σ head results + b_O
        bias = model.accumulated_bias(model.cfg.n_layers, include_mlp_biases=False).expand_as(stack[0])
        stack, labels = torch.cat([stack, cache.apply_ln_to_stack(bias[None].clone(), -1)]), [*labels, "attn_bias"]
    return stack, [label.removesuffix("_out") for label in labels]


@torch.no_grad()
def direct_logit_attribution(
    model: HookedLlava, inputs: LlavaInputs, token_a: Target = None, token_b: Target = None, unit: str = "head"
) -> pd.DataFrame:
    """Direct logit attribution of `logit[a] − logit[b]` at the last position.

    The final-layer residual is split into components (TransformerLens `stack_head_results` /
    `decompose_resid`), each divided by the final norm's cached scale (`apply_ln_to_stack`)
    and projected on `g ⊙ (W_U[:, a] − W_U[:, b])`. The cache helpers leave out the norm weight
    `g`, which is only exact after `fold_ln`; multiplying by `g` here makes the attribution
    exact for folded and unfolded models alike.

    Args:
        model: the model.
        inputs: the prepared batch.
        token_a: token(s) whose logit is explained (default: the model's top-1 prediction).
        token_b: token(s) subtracted (default: none, i.e. attribute `logit[a]` itself).
        unit: "head" (components `embed`, every head `"{layer}_{head}"`, every `"{layer}_mlp"`)
            or "layer" (`embed`, `"{layer}_attn"`, `"{layer}_mlp"`).

    Returns:
        Columns `batch, component, attribution`; per row the attributions sum to the logit
        difference.

    Example:
        >>> dla = direct_logit_attribution(model, inputs, "red", "blue")
        >>> dla.groupby("batch")["attribution"].sum()  # = logit[red] - logit[blue]
    """
    n = model.cfg.n_layers
    names = [f"blocks.{i}.{h}" for i in range(n) for h in ("attn.hook_z", "hook_attn_out", "hook_mlp_out")]
    names += ["hook_embed", _final_name(model), "ln_final.hook_scale"]
    acts = collect(model, inputs, dict.fromkeys(names, at_positions(_last(inputs))))
    stack, labels = _dla_stack(model, ActivationCache(acts, model), unit)
    logits = read_out(model, acts[_final_name(model)])[:, 0]
    direction = model.W_U.T[resolve_targets(model, token_a, logits)]
    if token_b is not None:
        direction = direction - model.W_U.T[resolve_targets(model, token_b, logits)]
    attribution = torch.einsum("cbpd,bd->bc", stack.float(), (direction * model.ln_final.w).float())
    batch = torch.arange(attribution.shape[0]).repeat_interleave(len(labels)).numpy()
    return pd.DataFrame({"batch": batch, "component": labels * len(inputs), "attribution": attribution.flatten().cpu()})
