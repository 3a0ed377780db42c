"""What each unit writes to the last position, and study A's frozen readout that scores it.

The pieces the attribution methods share: the token explained in each row (`resolve_targets`),
the readout with the final norm's scale held fixed (`FrozenReadout`), activations at each row's
last position (`run_at_last`, `last_query`, `stack_layers`), and the vectors a head or a key
position adds to the last residual (`head_vectors`, `position_vectors`).
The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses import ranges
from analyses.readout import at_positions, collect, read_out
from hooked_llava import HookedLlava, LlavaInputs

Target = int | str | Sequence[int | str] | Tensor | None


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
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TypeError(
                f"target must hold token ids (an integer tensor), got a {target.dtype} tensor: logits or "
                "probabilities are not tokens; pass e.g. logits.argmax(-1) or the ids themselves."
            )
        if target.ndim > 1 or target.numel() not in (1, batch):
            raise ValueError(
                f"target must be one token id or one per row ({batch} rows), "
                f"got a tensor of shape {tuple(target.shape)}."
            )
        ids = target.to(logits.device).long().reshape(-1).expand(batch)
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
