"""Transformer building blocks shared by the language model and the vision tower.

Every intermediate goes through a `HookPoint` whose return value is the value used
downstream, under the legacy HookedTransformer names. Weights are stored in `F.linear`
layout (as HF does, so the numerics match); the TransformerLens per-head layout
(`W_Q [n_heads, d_model, d_head]`, ...) is exposed as views.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from hooked_llava.model import tl_state
from hooked_llava.model.hook_points import HookPoint, NoLayerError, allow_broadcasting_hooks  # noqa: F401 (re-exported)


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

    def forward(self, x: Float[Tensor, "batch pos *head d_model"]) -> Float[Tensor, "batch pos *head d_model"]:
        dtype = x.dtype
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.w * self.hook_normalized((x32 / scale).to(dtype))


class Embed(nn.Module):
    """Token embedding `W_E [d_vocab, d_model]` (TransformerLens' name and layout, which is also HF's)."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.W_E = _param(d_vocab, d_model)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class Unembed(nn.Module):
    """The unembedding, stored as HF's `w_u [d_vocab, d_model]` (so logits match HF) and shown as
    TransformerLens' `W_U [d_model, d_vocab]` and `b_U` (zeros: LLaVA's head has no bias), also in
    `state_dict()` (see `hooked_llava.model.tl_state`)."""

    def __init__(self, d_vocab: int, d_model: int):
        super().__init__()
        self.w_u = _param(d_vocab, d_model)
        tl_state.register(self, tl_state.unembed_specs(d_model, d_vocab))

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.w_u)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.w_u.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.w_u.new_zeros(self.w_u.shape[0])


class LayerNorm(nn.Module):
    """CLIP's LayerNorm; uses the fused kernel unless one of its hooks is in use or
    `cfg.use_eager_attention` asks for the explicit path everywhere (the two round differently)."""

    def __init__(self, d_model: int, eps: float, cfg: Any = None):
        super().__init__()
        self.cfg = cfg
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model], after weight and bias

    def forward(self, x: Float[Tensor, "batch pos *head d_model"]) -> Float[Tensor, "batch pos *head d_model"]:
        eager = bool(getattr(self.cfg, "use_eager_attention", False))
        if not (eager or self.hook_scale.active() or self.hook_normalized.active()):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)
        centred = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(centred / scale * self.w + self.b)


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


def repeat_heads(x: Float[Tensor, "batch pos d_model"], n_heads: int) -> Float[Tensor, "batch pos n_heads d_model"]:
    """One copy of the residual per head (copies, so that editing one head leaves the others)."""
    return x[:, :, None].expand(-1, -1, n_heads, -1).clone()


class TransformerBlock(nn.Module):
    """A pre-norm residual block: `resid_pre → attn → resid_mid → mlp → resid_post`.

    As TransformerLens' block, it returns the residual after the block, and reads its switches
    from `cfg` at every call: `use_attn_in` (`hook_attn_in`, `[batch, pos, n_heads, d_model]`),
    `use_split_qkv_input` (`hook_q_input` `[batch, pos, n_heads, d_model]`, `hook_k_input` and
    `hook_v_input` with `n_kv_heads`) and `use_hook_mlp_in` (`hook_mlp_in`). With per-head inputs the
    first norm runs per head (its hooks gain a head dimension), as in TransformerLens.
    """

    attn: Any  # an `hooked_llava.model.attention.Attention`

    def __init__(self, cfg: Any, attn: nn.Module, mlp: nn.Module, ln1: nn.Module, ln2: nn.Module):
        super().__init__()
        self.cfg = cfg
        # Registered in firing order, so `model.hook_dict` lists hooks as they run.
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in, self.hook_q_input, self.hook_k_input, self.hook_v_input = (HookPoint() for _ in range(4))
        self.ln1, self.attn, self.hook_attn_out = ln1, attn, HookPoint()
        self.hook_resid_mid, self.hook_mlp_in = HookPoint(), HookPoint()
        self.ln2, self.mlp, self.hook_mlp_out = ln2, mlp, HookPoint()
        self.hook_resid_post = HookPoint()

    def forward(
        self,
        resid_pre: Float[Tensor, "batch pos d_model"],
        shortformer_pos_embed: Tensor | None = None,
        past_kv_cache_entry: Any = None,
        attention_mask: Tensor | None = None,
        *,
        additive_attention_mask: Tensor | None = None,
        rotary: tuple[Tensor, Tensor] | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """TransformerLens' signature; see `Attention.forward` for the masks, cache entry and rotary
        tables (all optional: the block alone is causal over positions `0..pos-1`)."""
        if shortformer_pos_embed is not None:
            raise ValueError("LLaVA has rotary positions, so there is no shortformer_pos_embed; pass None.")
        resid_pre = self.hook_resid_pre(resid_pre)
        q_in, k_in, v_in = self._attn_inputs(resid_pre)
        q_n = self.ln1(q_in)
        k_n, v_n = (q_n, q_n) if k_in is q_in else (self.ln1(k_in), self.ln1(v_in))
        attn_out = self.attn(q_n, k_n, v_n, past_kv_cache_entry, additive_attention_mask, attention_mask, rotary=rotary)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(attn_out))
        mlp_in = self.hook_mlp_in(resid_mid.clone()) if self.cfg.use_hook_mlp_in else resid_mid
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(mlp_in)))
        return self.hook_resid_post(resid_mid + mlp_out)

    def _attn_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value inputs: the residual itself, or per-head copies through the hooks."""
        if not (self.cfg.use_attn_in or self.cfg.use_split_qkv_input):
            return x, x, x
        n_heads, n_kv = self.attn.n_heads, self.attn.n_kv_heads
        if self.cfg.use_attn_in:  # multi-head attention only (see `set_use_attn_in`)
            x = self.hook_attn_in(repeat_heads(x, n_heads))
            if not self.cfg.use_split_qkv_input:
                return x, x, x
            q_in, k_in, v_in = x.clone(), x.clone(), x.clone()
        else:
            q_in, k_in, v_in = repeat_heads(x, n_heads), repeat_heads(x, n_kv), repeat_heads(x, n_kv)
        return self.hook_q_input(q_in), self.hook_k_input(k_in), self.hook_v_input(v_in)
