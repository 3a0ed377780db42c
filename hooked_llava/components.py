"""Transformer building blocks shared by the language model and the vision tower.

Every intermediate goes through a `HookPoint` whose return value is the value used
downstream, under the legacy HookedTransformer names. Weights are stored in `F.linear`
layout (as HF does, so the numerics match); the TransformerLens per-head layout
(`W_Q [n_heads, d_model, d_head]`, ...) is exposed as views.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .hook_points import HookPoint, allow_broadcasting_hooks  # noqa: F401 (re-exported)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "quick_gelu": quick_gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


class RMSNorm(nn.Module):
    """HF's Llama RMSNorm: statistics in fp32, cast back, then the weight."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1], the divisor
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], before the weight

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        dtype = x.dtype
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.w * self.hook_normalized((x32 / scale).to(dtype))


class LayerNorm(nn.Module):
    """CLIP's LayerNorm; uses the fused kernel unless one of its hooks is in use."""

    def __init__(self, d_model: int, eps: float):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], after weight and bias

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (self.hook_scale.active() or self.hook_normalized.active()):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        centred = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(centred / scale * self.w + self.b)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(position_ids: Tensor, d_head: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin tables `[batch, pos, 1, d_head]`, computed in fp32 as HF does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.float, device=position_ids.device) / d_head))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, :, None], emb.sin().to(dtype)[:, :, None]


class Attention(nn.Module):
    """Multi-head / grouped-query attention with the legacy TransformerLens hooks.

    Scores and patterns are only materialised (eager path) when a hook on them is in use;
    otherwise `scaled_dot_product_attention` computes the same thing fused.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_head: int,
        n_kv_heads: int,
        bias: bool,
        rotary: bool,
        o_bias: bool | None = None,
    ):
        super().__init__()
        self.n_heads, self.d_head, self.n_kv_heads = n_heads, d_head, n_kv_heads
        self.rotary = rotary
        self.w_q = _param(n_heads * d_head, d_model)
        self.w_k = _param(n_kv_heads * d_head, d_model)
        self.w_v = _param(n_kv_heads * d_head, d_model)
        self.w_o = _param(d_model, n_heads * d_head)
        for name, size in (("b_q", n_heads * d_head), ("b_k", n_kv_heads * d_head), ("b_v", n_kv_heads * d_head)):
            self.register_parameter(name, _param(size) if bias else None)
        self.b_o = _param(d_model) if (bias if o_bias is None else o_bias) else None
        names = ["hook_q", "hook_k", "hook_v", "hook_attn_scores", "hook_pattern", "hook_z", "hook_result"]
        if rotary:
            names[3:3] = ["hook_rot_q", "hook_rot_k"]
        for name in names:
            setattr(self, name, HookPoint())

    def needs_eager(self) -> bool:
        return self.hook_attn_scores.active() or self.hook_pattern.active()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], tuple[Tensor, Tensor]]:
        """Returns the attention output and this call's (key, value) for a KV cache."""
        b, p, _ = x.shape
        q = self.hook_q(F.linear(x, self.w_q, self.b_q).view(b, p, self.n_heads, self.d_head))
        k = self.hook_k(F.linear(x, self.w_k, self.b_k).view(b, p, self.n_kv_heads, self.d_head))
        v = self.hook_v(F.linear(x, self.w_v, self.b_v).view(b, p, self.n_kv_heads, self.d_head))
        if rotary is not None:
            cos, sin = rotary
            q = self.hook_rot_q(q * cos + rotate_half(q) * sin)
            k = self.hook_rot_k(k * cos + rotate_half(k) * sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        z = self.hook_z(self._attend(q, k, v, mask))
        return self._project(z), (k, v)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = 1 / math.sqrt(self.d_head)
        if not self.needs_eager():
            causal = mask is None and q.shape[1] > 1 and self.rotary
            z = F.scaled_dot_product_attention(
                qh,
                kh,
                vh,
                attn_mask=mask,
                is_causal=causal,
                scale=scale,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )
            return z.transpose(1, 2)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)
        scores = torch.matmul(qh, kh.transpose(2, 3)) * scale
        if mask is not None:
            scores = scores + mask
        elif self.rotary and q.shape[1] > 1:
            scores = scores + causal_mask(q.shape[1], q.shape[1], q.dtype, q.device)
        scores = self.hook_attn_scores(scores)
        # fp32 softmax as HF does (fp64 stays fp64, where finfo(fp64).min would overflow fp32)
        softmax_dtype = torch.promote_types(q.dtype, torch.float32)
        pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=softmax_dtype).to(q.dtype))
        return torch.matmul(pattern, vh).transpose(1, 2)

    def _project(self, z: Float[Tensor, "batch pos n_heads d_head"]) -> Float[Tensor, "batch pos d_model"]:
        if not self.hook_result.active():
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


def causal_mask(n_q: int, n_k: int, dtype: torch.dtype, device: Any) -> Tensor:
    """Additive causal mask `[n_q, n_k]` for queries that are the last `n_q` of `n_k` keys."""
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(n_k - n_q)
    return torch.zeros(n_q, n_k, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class _MLPWeights(nn.Module):
    """TransformerLens views of an MLP's weights; missing biases read as zeros."""

    bias_in: Tensor | None
    bias_out: Tensor | None
    W_in = property(lambda self: self.w_in.T)
    W_out = property(lambda self: self.w_out.T)
    b_in = property(lambda self: _or_zeros(self.bias_in, self.w_in.shape[0], self.w_in))
    b_out = property(lambda self: _or_zeros(self.bias_out, self.w_out.shape[0], self.w_out))


def _or_zeros(b: Tensor | None, n: int, like: Tensor) -> Tensor:
    return like.new_zeros(n) if b is None else b


class GatedMLP(_MLPWeights):
    """Llama's SiLU-gated MLP: `W_out(act(x W_gate) * x W_in)`."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str, bias: bool):
        super().__init__()
        self.w_gate, self.w_in, self.w_out = _param(d_mlp, d_model), _param(d_mlp, d_model), _param(d_model, d_mlp)
        self.bias_gate = _param(d_mlp) if bias else None
        self.bias_in = _param(d_mlp) if bias else None
        self.bias_out = _param(d_model) if bias else None
        self.act = ACTIVATIONS[act_fn]
        self.hook_pre, self.hook_pre_linear, self.hook_post = HookPoint(), HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.w_gate, self.bias_gate))
        pre_linear = self.hook_pre_linear(F.linear(x, self.w_in, self.bias_in))
        return F.linear(self.hook_post(self.act(pre) * pre_linear), self.w_out, self.bias_out)

    W_gate = property(lambda self: self.w_gate.T)


class MLP(_MLPWeights):
    """CLIP's two-layer MLP: `W_out(act(x W_in))`."""

    def __init__(self, d_model: int, d_mlp: int, act_fn: str):
        super().__init__()
        self.w_in, self.bias_in = _param(d_mlp, d_model), _param(d_mlp)
        self.w_out, self.bias_out = _param(d_model, d_mlp), _param(d_model)
        self.act = ACTIVATIONS[act_fn]
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(x, self.w_in, self.bias_in))
        return F.linear(self.hook_post(self.act(pre)), self.w_out, self.bias_out)


class TransformerBlock(nn.Module):
    """A pre-norm residual block: `resid_pre → attn → resid_mid → mlp → resid_post`."""

    def __init__(self, attn: Attention, mlp: nn.Module, ln1: nn.Module, ln2: nn.Module):
        super().__init__()
        # Registered in firing order, so `model.hook_dict` lists hooks as they run.
        self.hook_resid_pre = HookPoint()
        self.ln1, self.attn, self.hook_attn_out = ln1, attn, HookPoint()
        self.hook_resid_mid = HookPoint()
        self.ln2, self.mlp, self.hook_mlp_out = ln2, mlp, HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], tuple[Tensor, Tensor]]:
        resid_pre = self.hook_resid_pre(x)
        attn_out, kv = self.attn(self.ln1(resid_pre), mask, rotary, past)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))
        return self.hook_resid_post(resid_mid + mlp_out), kv
