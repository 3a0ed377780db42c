"""Weight views in TransformerLens layout, QK/OV circuits, and weight processing.

Processing follows legacy TransformerLens and preserves log-probabilities exactly (up to
float error): `fold_ln` folds each RMSNorm weight into the matrices that read from it;
`center_unembed` subtracts the vocabulary mean from `W_U` (a constant logit shift).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix


def _expand_kv(w: Tensor, n_heads: int) -> Tensor:
    """Repeat grouped key/value heads so there is one per query head (`[..., head, ...]`)."""
    return w.repeat_interleave(n_heads // w.shape[-3], dim=-3)


def qk_circuit(W_Q: Tensor, W_K: Tensor) -> FactoredMatrix:
    return FactoredMatrix(W_Q, _expand_kv(W_K, W_Q.shape[-3]).transpose(-2, -1))


def ov_circuit(W_V: Tensor, W_O: Tensor) -> FactoredMatrix:
    return FactoredMatrix(_expand_kv(W_V, W_O.shape[-3]), W_O)


class WeightsMixin:
    """Stacked per-layer weights of the language model, TransformerLens-style."""

    blocks: Any
    cfg: Any
    w_e: Tensor
    w_u: Tensor
    ln_final: Any

    def _stack(self, get: Any) -> Tensor:
        return torch.stack([get(b) for b in self.blocks])

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.w_e

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.w_u.T

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.w_u.new_zeros(self.w_u.shape[0])

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q))
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K))
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V))
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O))
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q))
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K))
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V))
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O))
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in))
    W_gate = property(lambda self: self._stack(lambda b: b.mlp.W_gate))
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out))
    b_in = property(lambda self: self._stack(lambda b: b.mlp.b_in))
    b_out = property(lambda self: self._stack(lambda b: b.mlp.b_out))

    @property
    def QK(self) -> FactoredMatrix:
        """`[n_layers, n_heads, d_model, d_model]` as a FactoredMatrix (pre-rotary, as in TransformerLens)."""
        return qk_circuit(self.W_Q, self.W_K)

    @property
    def OV(self) -> FactoredMatrix:
        return ov_circuit(self.W_V, self.W_O)

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """Sum of the attention-output and MLP-output biases written before `layer` (zeros for Llama)."""
        total = self.w_e.new_zeros(self.cfg.d_model)
        for i, block in enumerate(self.blocks[: layer + int(mlp_input)]):
            total = total + block.attn.b_O
            if include_mlp_biases and i < layer:
                total = total + block.mlp.b_out
        return total

    @torch.no_grad()
    def process_weights(self, fold_ln: bool = True, center_unembed: bool = True) -> Any:
        """Fold RMSNorm weights into the next matrices and/or centre the unembedding, in place.

        After `fold_ln`, `cfg.normalization_type` is "RMSPre" and the norms' weights are ones,
        so `ActivationCache.apply_ln_to_stack` and `logit_attrs` are exact.
        """
        if fold_ln and self.cfg.normalization_type == "RMS":
            for block in self.blocks:
                g1, g2 = block.ln1.w, block.ln2.w
                for w in (block.attn.w_q, block.attn.w_k, block.attn.w_v):
                    w.mul_(g1)
                block.mlp.w_gate.mul_(g2)
                block.mlp.w_in.mul_(g2)
                g1.fill_(1.0)
                g2.fill_(1.0)
            self.w_u.mul_(self.ln_final.w)
            self.ln_final.w.fill_(1.0)
            self.cfg.normalization_type = "RMSPre"
        if center_unembed:
            self.w_u.sub_(self.w_u.mean(0, keepdim=True))
        return self
