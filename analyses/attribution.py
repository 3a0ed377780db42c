"""Study A's log-probability increase and direct logit attribution.

The log-probability increase scores a vector `v` added to a residual `x` at the last position:

    score(v | x) = log P(x + v)[y] − log P(x)[y],   P(v) = softmax(W_U (g ⊙ v / sqrt(σ² + ε)))

with `g` the final RMSNorm weight and `σ²` the mean square of the final-layer residual at the
last position, held fixed for every vector scored (METHODS.md §2). Units: attention and MLP
layers, heads, positions inside a head, and MLP neurons. Direct logit attribution splits a
logit difference into per-head / per-layer terms with the TransformerLens cache helpers.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from hooked_llava import HookedLlava, LlavaInputs

from . import ranges
from .readout import at_positions, collect, read_out

Target = int | str | Sequence[int | str] | Tensor | None
Unit = Literal["layer", "head", "position", "neuron"]


def _last(inputs: LlavaInputs) -> Int[Tensor, "batch 1"]:
    return inputs.last[:, None]


def last_query(inputs: LlavaInputs) -> Any:
    """A `collect` selector taking a pattern `[batch, head, q, k]` to the last query's row `[batch, head, k]`.

    Example:
        >>> collect(model, inputs, {"blocks.0.attn.hook_pattern": last_query(inputs)}, stop_at_layer=1)
    """
    rows, last = torch.arange(len(inputs)), inputs.last.cpu()
    return lambda pattern: pattern[rows.to(pattern.device), :, last.to(pattern.device)]


def resolve_targets(
    model: HookedLlava, target: Target, logits: Float[Tensor, "batch d_vocab"]
) -> Int[Tensor, " batch"]:
    """The token explained in each row: the top-1 prediction (None), one token, or one per row.

    Example:
        >>> resolve_targets(model, "red", torch.zeros(2, model.cfg.d_vocab))  # tensor([21, 21])
    """
    batch = logits.shape[0]
    if target is None:
        return logits.argmax(-1)
    if isinstance(target, Tensor):
        ids = target.to(logits.device).long().expand(batch)
        for i in ids.unique().tolist():
            ranges.token_id(i, model.cfg.d_vocab)
        return ids
    items = [target] * batch if isinstance(target, (int, str)) else list(target)
    if len(items) != batch:
        raise ValueError(f"give one target for all rows or one per row: got {len(items)} for {batch} rows.")
    ids = [model.to_single_token(t) if isinstance(t, str) else ranges.token_id(t, model.cfg.d_vocab) for t in items]
    return torch.tensor(ids, device=logits.device)


class FrozenReadout:
    """Study A's readout `log softmax(W_U (g ⊙ v / sqrt(σ² + ε)))[y]` with σ² fixed per row.

    Args:
        model: the model (`ln_final.w`, `ln_final.eps`, `W_U`).
        final_resid: the final-layer residual (`resid_post` of the last block) at the last position.
        target: the explained token per row (see `resolve_targets`); default the model's top-1.
        chunk_size: vectors read out per matrix product, to bound memory.
        dtype: precision of the readout. Default: `torch.promote_types(model dtype, float32)`, so
            at least float32 and a float64 model reads out in float64. Pass `torch.float64` to
            resolve score differences below float32's ~1e-5 nats on a float32 model.

    Example:
        >>> acts = run_at_last(model, inputs, ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out"])
        >>> readout = FrozenReadout(model, acts[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"])
        >>> readout.score(acts["blocks.1.hook_resid_pre"], acts["blocks.1.hook_attn_out"])  # layer 1's attention
    """

    def __init__(
        self,
        model: HookedLlava,
        final_resid: Float[Tensor, "batch d_model"],
        target: Target = None,
        chunk_size: int = 1024,
        dtype: torch.dtype | None = None,
    ):
        self.dtype = torch.promote_types(model.W_U.dtype, torch.float32) if dtype is None else dtype
        x = final_resid.to(self.dtype)
        self.scale = (x.pow(2).mean(-1) + model.ln_final.eps).sqrt()  # [batch]
        self.g, self.W_U = model.ln_final.w.to(self.dtype), model.W_U.to(self.dtype)
        self.y = resolve_targets(model, target, read_out(model, final_resid[:, None])[:, 0])
        self.chunk_size = ranges.count(chunk_size, "chunk_size")

    def log_prob(self, x: Float[Tensor, "batch *units d_model"]) -> Float[Tensor, " batch *units"]:
        """`log P(x)[y]` for every vector of every row."""
        flat = x.to(self.dtype).reshape(x.shape[0], -1, x.shape[-1])
        out = torch.empty(flat.shape[:2], device=x.device, dtype=self.dtype)
        for b in range(flat.shape[0]):
            for s in range(0, flat.shape[1], self.chunk_size):
                h = self.g * flat[b, s : s + self.chunk_size] / self.scale[b]
                out[b, s : s + self.chunk_size] = (h @ self.W_U).log_softmax(-1)[:, self.y[b]]
        return out.reshape(x.shape[:-1])

    def score(self, x: Float[Tensor, "batch *xunits d_model"], v: Float[Tensor, "batch *units d_model"]) -> Tensor:
        """`log P(x + v)[y] − log P(x)[y]`; `x` broadcasts against `v` (both taken in the readout's dtype)."""
        x, v = x.to(self.dtype), v.to(self.dtype)
        return self.log_prob(x + v) - self.log_prob(x)


def _final_name(model: HookedLlava) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def run_at_last(
    model: HookedLlava, inputs: LlavaInputs, names: list[str], extra: dict | None = None
) -> dict[str, Tensor]:
    """Activations at each row's last position (`[batch, ...]`) for `names` and the final residual,
    plus whatever the `extra` selectors keep; the blocks run, the unembedding does not.

    Example:
        >>> run_at_last(model, inputs, ["blocks.0.hook_resid_pre"])["blocks.0.hook_resid_pre"].shape
    """
    select = at_positions(_last(inputs))
    selects = {name: (lambda a, s=select: s(a)[:, 0]) for name in [*names, _final_name(model)]}
    return collect(model, inputs, {**selects, **(extra or {})}, stop_at_layer=model.cfg.n_layers)


def stack_layers(acts: dict[str, Tensor], template: str, n: int) -> Tensor:
    """`acts[template.format(layer)]` for layers `0..n-1`, stacked on dim 1 (after the batch).

    Example:
        >>> acts = run_at_last(model, inputs, [f"blocks.{i}.hook_resid_pre" for i in range(3)])
        >>> stack_layers(acts, "blocks.{}.hook_resid_pre", 3).shape  # [batch, 3, d_model]
    """
    return torch.stack([acts[template.format(layer)] for layer in range(n)], dim=1)


def head_vectors(
    model: HookedLlava, z_last: Float[Tensor, "batch layer head d_head"]
) -> Float[Tensor, "batch layer head d_model"]:
    """Each head's result at the last position, `z_h W_O^h` (= Σ_j A[last, j] v_j W_O^h).

    Example:
        >>> acts = run_at_last(model, inputs, [f"blocks.{i}.attn.hook_z" for i in range(model.cfg.n_layers)])
        >>> head_vectors(model, stack_layers(acts, "blocks.{}.attn.hook_z", model.cfg.n_layers)).shape
    """
    return torch.einsum("blhd,lhdm->blhm", z_last, model.W_O.to(z_last.dtype))


def _head_scores(model: HookedLlava, inputs: LlavaInputs, readout_args: dict) -> Tensor:
    n = model.cfg.n_layers
    acts = run_at_last(model, inputs, [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "attn.hook_z")])
    readout = FrozenReadout(model, acts[_final_name(model)], **readout_args)
    x = stack_layers(acts, "blocks.{}.hook_resid_pre", n)[:, :, None]  # [batch, layer, 1, d_model]
    return readout.score(x, head_vectors(model, stack_layers(acts, "blocks.{}.attn.hook_z", n)))


def position_vectors(
    model: HookedLlava,
    layer: int,
    head: int,
    pattern_last: Float[Tensor, "batch head pos"],
    v: Float[Tensor, "batch pos kv d_head"],
) -> Float[Tensor, "batch pos d_model"]:
    """`A[l, h][last, j] · v_j W_O^h` for every key position j (grouped kv heads shared).

    Example:
        >>> acts = collect(model, inputs, {"blocks.1.attn.hook_pattern": last_query(inputs),
        ...                                "blocks.1.attn.hook_v": lambda v: v}, stop_at_layer=2)
        >>> position_vectors(model, 1, 0, acts["blocks.1.attn.hook_pattern"], acts["blocks.1.attn.hook_v"]).shape
    """
    kv = head // (model.cfg.n_heads // v.shape[2])
    weighted = pattern_last[:, head, :, None] * v[:, :, kv]  # [batch, pos, d_head]
    return weighted @ model.blocks[layer].attn.W_O[head].to(v.dtype)


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
