"""Weight views in TransformerLens layout, QK/OV circuits, and weight processing.

Processing follows legacy TransformerLens' `process_weights_` and preserves log-probabilities
exactly (up to float error); see `WeightsMixin.process_weights`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix

REFACTOR_REFUSED = (
    "refactor_factored_attn_matrices is impossible with rotary embeddings: the QK matrix depends on "
    "the positions of query and key (TransformerLens refuses it too). Pass False."
)


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
    embed: Any
    unembed: Any
    ln_final: Any

    def _stack(self, get: Any) -> Tensor:
        return torch.stack([get(b) for b in self.blocks])

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        return self.unembed.b_U

    # The stored parameters' earlier names, kept for code written before `embed`/`unembed` existed.
    w_e = property(lambda self: self.embed.W_E)
    w_u = property(lambda self: self.unembed.w_u)

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
        total = self.W_E.new_zeros(self.cfg.d_model)
        for i, block in enumerate(self.blocks[: layer + int(mlp_input)]):
            total = total + block.attn.b_O
            if include_mlp_biases and i < layer:
                total = total + block.mlp.b_out
        return total

    @torch.no_grad()
    def process_weights(
        self,
        fold_ln: bool = True,
        center_writing_weights: bool = False,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> Any:
        """TransformerLens' `process_weights_` for an RMSNorm Llama, in place; log-probs are unchanged.

        - `fold_ln`: each RMSNorm weight is multiplied into the matrices that read from it;
          `cfg.normalization_type` becomes "RMSPre" and the norms' weights ones, so
          `ActivationCache.apply_ln_to_stack` and `logit_attrs` are exact.
        - `center_writing_weights`: a no-op with a warning. Centring the residual only commutes with
          LayerNorm, which subtracts the mean; TransformerLens skips it for RMSNorm models too.
        - `center_unembed`: subtract the vocabulary mean from `W_U` (a constant shift of every logit).
        - `fold_value_biases`: `b_O += Σ_h b_V[h] @ W_O[h]` and `b_V = 0` (exact: each pattern row sums
          to 1). A model with value biases but no output bias (Qwen2) gains a `b_O` parameter, as in TL.
        - `refactor_factored_attn_matrices`: refused, as TransformerLens refuses it for rotary models.
        """
        if refactor_factored_attn_matrices:
            raise ValueError(
                "refactor_factored_attn_matrices is impossible with rotary embeddings: the QK matrix depends on "
                "the positions of query and key (TransformerLens refuses it too). Pass False."
            )
        if center_writing_weights:
            warnings.warn(
                "center_writing_weights skipped: the language model uses RMSNorm, which does not subtract the "
                "mean, so the writing weights cannot be centred (as in TransformerLens).",
                stacklevel=2,
            )
        if fold_ln and self.cfg.normalization_type == "RMS":
            self._fold_ln()
        if center_unembed:
            self.unembed.w_u.sub_(self.unembed.w_u.mean(0, keepdim=True))
        if fold_value_biases:
            self._fold_value_biases()
        return self

    def _fold_ln(self) -> None:
        for block in self.blocks:
            g1, g2 = block.ln1.w, block.ln2.w
            for w in (block.attn.w_q, block.attn.w_k, block.attn.w_v):
                w.mul_(g1)
            block.mlp.w_gate.mul_(g2)
            block.mlp.w_in.mul_(g2)
            g1.fill_(1.0)
            g2.fill_(1.0)
        self.unembed.w_u.mul_(self.ln_final.w)
        self.ln_final.w.fill_(1.0)
        self.cfg.normalization_type = "RMSPre"

    def _fold_value_biases(self) -> None:
        for block in self.blocks:
            attn = block.attn
            if attn.b_v is None:
                continue
            b_v = _expand_kv(attn.b_V[:, None], attn.n_heads)[:, 0]  # [n_heads, d_head]
            folded = torch.einsum("hd,hdm->m", b_v, attn.W_O)
            if attn.b_o is None:
                attn.b_o = nn.Parameter(torch.zeros_like(folded))
            attn.b_o.add_(folded)
            attn.b_v.zero_()
