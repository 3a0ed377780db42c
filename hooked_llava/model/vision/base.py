"""What every vision tower shares: its pre-norm blocks, the selection of feature layers, and the
per-layer weights in TransformerLens layout.

A tower computes only the blocks up to the deepest selected feature layer: the later blocks and the
post-LayerNorm never reach the language model, so they are not built. Its blocks follow the model's
hook switches (`model.set_use_attn_result(True)` etc. set `model.vision.cfg` too).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix

from hooked_llava.model.attention import Attention
from hooked_llava.model.components import MLP, LayerNorm, TransformerBlock
from hooked_llava.model.config import VisionConfig
from hooked_llava.model.weights import ov_circuit, qk_circuit


class TowerBase(nn.Module):
    """`n_layers_computed` bidirectional pre-LayerNorm blocks and the feature selection."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg

    def _build_blocks(self) -> nn.ModuleList:
        cfg, d = self.cfg, self.cfg.d_model
        return nn.ModuleList(
            TransformerBlock(
                cfg,
                Attention(cfg, cfg.n_heads, bias=True),
                MLP(d, cfg.d_mlp, cfg.act_fn),
                LayerNorm(d, cfg.eps, cfg),
                LayerNorm(d, cfg.eps, cfg),
            )
            for _ in range(cfg.n_layers_computed)
        )

    def run_blocks(self, x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch _ d_in"]:
        """Run the computed blocks on the embedded patches and select the feature layers as HF does:
        hidden state k is the residual after k blocks; "default" drops the first position (CLIP's
        CLS; for a tower without CLS, HF drops its first patch too), "full" keeps every position."""
        states = [x]
        for block in self.blocks:
            x = block(x)
            states.append(x)
        features = torch.cat([states[k] for k in self.cfg.feature_layers], dim=-1)
        return features[:, 1:] if self.cfg.select_strategy == "default" else features

    def _stack(self, get: Any) -> Tensor:
        return torch.stack([get(b) for b in self.blocks])

    # Per-layer weights of the computed blocks, in TransformerLens layout ([n_layers, ...]).
    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q))
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K))
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V))
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O))
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in))
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out))

    @property
    def QK(self) -> FactoredMatrix:
        return qk_circuit(self.W_Q, self.W_K)

    @property
    def OV(self) -> FactoredMatrix:
        return ov_circuit(self.W_V, self.W_O)
