"""Multi-head / grouped-query attention with TransformerLens' hooks, signature and switches.

`Attention.forward(query_input, key_input=None, value_input=None, past_kv_cache_entry=None,
additive_attention_mask=None, attention_mask=None)` returns the attention output `[batch, pos,
d_model]`, as TransformerLens'. Called with the input alone, a language-model attention is causal
with rotary positions `0..pos-1` (after a KV-cache entry's past positions), using its own rotary
base; the vision tower's attention is bidirectional.

Numerics (fp32): scores and patterns are only materialised when a hook on them is in use, or
`cfg.use_eager_attention` is set; otherwise `scaled_dot_product_attention` computes the same thing
fused. The two paths round differently, so attaching a pattern or score hook moves the logits by
about 1e-7 relative (2e-7 on the tiny test model, ~1e-5 on shapes-llava's logits of ~30) unless
`model.set_use_eager_attention(True)` makes every attention (and vision LayerNorm) take the explicit
path; then hooked and unhooked logits are bit-identical. `cfg.use_attn_result` likewise switches the
output projection to per-head results (a different summation order, as in TransformerLens).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_llava.model.components import HookPoint
from hooked_llava.model.kv_cache import KeyValueCacheEntry


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(position_ids: Tensor, d_head: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[batch, pos, 1, d_head]`, computed in fp32 as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float, device=position_ids.device) / d_head))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


def causal_mask(n_q: int, n_k: int, dtype: torch.dtype, device: Any) -> Tensor:
    """Additive causal mask `[n_q, n_k]` for queries that are the last `n_q` of `n_k` keys."""
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
    return torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def additive_mask(
    mask2d: Tensor | None, n_q: int, n_past: int, dtype: torch.dtype, window: int | None, device: Any
) -> Tensor | None:
    """`[batch, 1, q, k]` causal mask with `finfo.min` where attention is forbidden (future keys,
    padding, keys beyond a sliding window), or None when causal masking alone suffices (the
    attention then uses the fused causal kernel)."""
    n_k = n_past + n_q
    if n_past == 0 and (mask2d is None or bool(mask2d.all())) and (window is None or window >= n_k):
        return None
    if mask2d is None:
        mask2d = torch.ones(1, n_k, dtype=torch.long, device=device)
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=mask2d.device).tril(n_past)
    if window is not None:  # HF: key index > query index - window (absolute sequence indices)
        allowed &= torch.ones_like(allowed).triu(n_past - window + 1)
    allowed = allowed[None] & mask2d[:, None, -n_k:].bool()
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=mask2d.device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


SOFTMAX_BLOCK = 1 << 20  # elements per fp32 block: 4 MiB, small enough for malloc to reuse without page faults


def softmax_fp32(scores: Tensor) -> Tensor:
    """`F.softmax(scores, -1, dtype=float32).to(scores.dtype)`, as HF eager computes the pattern
    (fp32 and fp64 scores keep their dtype), with the same values. For 16-bit scores the fp32 work is
    done a block of rows at a time, so no score-sized fp32 tensors are allocated (at 616 positions
    and 32 heads two 48 MB buffers, fresh pages at every layer)."""
    if scores.dtype in (torch.float32, torch.float64):
        return F.softmax(scores, dim=-1)
    pattern = torch.empty_like(scores, memory_format=torch.contiguous_format)
    rows, out = scores.reshape(-1, scores.shape[-1]), pattern.view(-1, scores.shape[-1])
    step = max(1, SOFTMAX_BLOCK // rows.shape[1])
    for i in range(0, rows.shape[0], step):
        block = rows[i : i + step].float()
        out[i : i + step] = torch.softmax(block, dim=-1, out=block)
    return pattern


def positions_from_mask(mask2d: Tensor | None, n_q: int, n_past: int, device: Any) -> Tensor:
    """Rotary positions `[batch, n_q]` of the newest `n_q` positions: counting real tokens of the
    mask (as `LlavaInputs.position_ids`), or `n_past..n_past+n_q-1` without a mask."""
    if mask2d is None:
        return torch.arange(n_past, n_past + n_q, device=device)[None]
    return (mask2d.long().cumsum(-1) - 1).clamp(min=0)[:, -n_q:]


class Attention(nn.Module):
    """Attention with the legacy TransformerLens hooks; `rotary_base` set means causal and rotary
    (the language model), None means bidirectional without positions (the vision tower)."""

    b_q: Tensor | None
    b_k: Tensor | None
    b_v: Tensor | None
    hook_q: HookPoint
    hook_k: HookPoint
    hook_v: HookPoint
    hook_rot_q: HookPoint
    hook_rot_k: HookPoint
    hook_attn_scores: HookPoint
    hook_pattern: HookPoint
    hook_z: HookPoint
    hook_result: HookPoint

    def __init__(
        self,
        cfg: Any,
        n_kv_heads: int,
        bias: bool,
        o_bias: bool | None = None,
        rotary_base: float | None = None,
        window: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        d_model, n_heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
        self.n_heads, self.d_head, self.n_kv_heads = n_heads, d_head, n_kv_heads
        self.rotary, self.rotary_base, self.window = rotary_base is not None, rotary_base, window
        self.w_q = nn.Parameter(torch.empty(n_heads * d_head, d_model))
        self.w_k = nn.Parameter(torch.empty(n_kv_heads * d_head, d_model))
        self.w_v = nn.Parameter(torch.empty(n_kv_heads * d_head, d_model))
        self.w_o = nn.Parameter(torch.empty(d_model, n_heads * d_head))
        for name, size in (("b_q", n_heads * d_head), ("b_k", n_kv_heads * d_head), ("b_v", n_kv_heads * d_head)):
            self.register_parameter(name, nn.Parameter(torch.empty(size)) if bias else None)
        use_o_bias = bias if o_bias is None else o_bias
        self.b_o = nn.Parameter(torch.empty(d_model)) if use_o_bias else None
        names = ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"]
        if self.rotary:
            names[3:3] = ["hook_rot_q", "hook_rot_k"]
        for name in names:
            setattr(self, name, HookPoint())

    def needs_eager(self) -> bool:
        eager = bool(getattr(self.cfg, "use_eager_attention", False))
        return eager or self.hook_attn_scores.active() or self.hook_pattern.active()

    def forward(
        self,
        query_input: Float[Tensor, "batch pos *head d_model"],
        key_input: Float[Tensor, "batch pos *kv_head d_model"] | None = None,
        value_input: Float[Tensor, "batch pos *kv_head d_model"] | None = None,
        past_kv_cache_entry: KeyValueCacheEntry | None = None,
        additive_attention_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """The attention output. Inputs are `[batch, pos, d_model]`, or per head `[batch, pos,
        n_heads (q) / n_kv_heads (k, v), d_model]` (TransformerLens' split inputs); key and value
        inputs default to the query input. `attention_mask` is `[batch, past + pos]` (1 = real
        token); `additive_attention_mask` `[batch, 1, pos, past + pos]` replaces the mask built from
        it; `rotary` = precomputed `(cos, sin)` replaces the positions derived from it."""
        key_input = query_input if key_input is None else key_input
        value_input = key_input if value_input is None else value_input
        q = self.hook_q(self._project_in(query_input, self.w_q, self.b_q, self.n_heads))
        k = self.hook_k(self._project_in(key_input, self.w_k, self.b_k, self.n_kv_heads))
        v = self.hook_v(self._project_in(value_input, self.w_v, self.b_v, self.n_kv_heads))
        n_past = 0 if past_kv_cache_entry is None else past_kv_cache_entry.n_past
        if self.rotary:
            if rotary is None:
                positions = positions_from_mask(attention_mask, q.shape[1], n_past, q.device)
                rotary = rotary_cos_sin(positions, self.d_head, self.rotary_base or 0.0, q.dtype)
            cos, sin = rotary
            q = self.hook_rot_q(q * cos + rotate_half(q) * sin)
            k = self.hook_rot_k(k * cos + rotate_half(k) * sin)
        if past_kv_cache_entry is not None:
            k, v = past_kv_cache_entry.append(k, v)
        mask = additive_attention_mask
        if mask is None and (self.rotary or attention_mask is not None):
            mask = self._mask(attention_mask, q.shape[1], n_past, q.dtype)
        z = self.hook_z(self._attend(q, k, v, mask))
        return self._project_out(z)

    def _mask(self, mask2d: Tensor | None, n_q: int, n_past: int, dtype: torch.dtype) -> Tensor | None:
        if self.rotary:
            return additive_mask(mask2d, n_q, n_past, dtype, self.window, self.w_q.device)
        assert mask2d is not None  # bidirectional: only padding to mask
        zeros = torch.zeros(mask2d.shape, dtype=dtype, device=mask2d.device)
        return zeros.masked_fill(~mask2d.bool(), torch.finfo(dtype).min)[:, None, None]

    def _project_in(self, x: Tensor, w: Tensor, b: Tensor | None, n: int) -> Tensor:
        """`[batch, pos, n, d_head]` from a shared input, or from one input per head."""
        if x.ndim == 3:
            return F.linear(x, w, b).view(*x.shape[:2], n, self.d_head)
        if x.shape[2] != n:
            raise ValueError(f"a per-head input needs {n} heads in dimension 2, got shape {tuple(x.shape)}.")
        out = torch.einsum("bphm,hdm->bphd", x, w.view(n, self.d_head, -1))
        return out if b is None else out + b.view(n, self.d_head)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = 1 / math.sqrt(self.d_head)
        if not self.needs_eager():
            causal = mask is None and q.shape[1] > 1 and self.rotary
            z = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=self.n_kv_heads != self.n_heads
            )
            return z.transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        # In place on the fresh matmul result (same values as out of place): no extra score-sized tensors.
        scores = torch.matmul(qh, kh.transpose(2, 3)).mul_(scale)
        if mask is None and self.rotary and q.shape[1] > 1:
            mask = causal_mask(q.shape[1], q.shape[1], q.dtype, q.device)
        if mask is not None:
            fits = torch.broadcast_shapes(scores.shape, mask.shape) == scores.shape
            scores = scores.add_(mask) if fits else scores + mask
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(softmax_fp32(scores))
        return torch.matmul(pattern, vh).transpose(1, 2)

    def _project_out(self, z: Float[Tensor, "batch pos n_heads d_head"]) -> Float[Tensor, "batch pos d_model"]:
        if not getattr(self.cfg, "use_attn_result", False):
            return F.linear(z.reshape(*z.shape[:2], -1), self.w_o, self.b_o)
        # Per-head results cost one batched matmul; summing them is cheaper than a second projection.
        result = torch.matmul(z.transpose(1, 2), self.W_O).transpose(1, 2)  # [batch, pos, head, d_model]
        out = self.hook_result(result).sum(2)
        return out if self.b_o is None else out + self.b_o

    # --- TransformerLens per-head views -------------------------------------------------
    @property
    def W_Q(self) -> Float[Tensor, "n_heads d_model d_head"]:
        return self.w_q.view(self.n_heads, self.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return self.w_k.view(self.n_kv_heads, self.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> Float[Tensor, "n_kv_heads d_model d_head"]:
        return self.w_v.view(self.n_kv_heads, self.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        return self.w_o.view(-1, self.n_heads, self.d_head).permute(1, 2, 0)

    def _bias(self, b: Tensor | None, n: int) -> Tensor:
        return self.w_q.new_zeros(n, self.d_head) if b is None else b.view(n, self.d_head)

    @property
    def b_Q(self) -> Float[Tensor, "n_heads d_head"]:
        return self._bias(self.b_q, self.n_heads)

    @property
    def b_K(self) -> Float[Tensor, "n_kv_heads d_head"]:
        return self._bias(self.b_k, self.n_kv_heads)

    @property
    def b_V(self) -> Float[Tensor, "n_kv_heads d_head"]:
        return self._bias(self.b_v, self.n_kv_heads)

    @property
    def b_O(self) -> Float[Tensor, " d_model"]:
        return self.w_o.new_zeros(self.w_o.shape[0]) if self.b_o is None else self.b_o
