"""The CLIP vision tower and the LLaVA projector, with hooks.

The tower computes only the blocks up to the deepest selected feature layer: in LLaVA the
last block and the post-LayerNorm never reach the language model, so they are not built.
Its blocks follow the model's hook switches (`model.set_use_attn_result(True)` etc. set
`model.vision.cfg` too): see `hooked_llava.surface.switches`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import FactoredMatrix

from hooked_llava.model.attention import Attention
from hooked_llava.model.components import ACTIVATIONS, MLP, HookPoint, LayerNorm, TransformerBlock
from hooked_llava.model.config import ProjectorConfig, VisionConfig
from hooked_llava.model.weights import ov_circuit, qk_circuit


class VisionTower(nn.Module):
    """CLIP ViT: patch conv, CLS and positions, pre-LayerNorm, then `n_layers_computed` blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.w_patch = nn.Parameter(torch.empty(d, cfg.n_channels, cfg.patch_size, cfg.patch_size))
        self.cls = nn.Parameter(torch.empty(d))
        self.w_pos = nn.Parameter(torch.empty(cfg.n_ctx, d))
        self.hook_patch_embed = HookPoint()  # [batch, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, 1 + n_patches, d_model]
        self.hook_embed = HookPoint()  # CLS + patches + positions, before ln_pre
        self.ln_pre = LayerNorm(d, cfg.eps, cfg)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg,
                Attention(cfg, cfg.n_heads, bias=True),
                MLP(d, cfg.d_mlp, cfg.act_fn),
                LayerNorm(d, cfg.eps, cfg),
                LayerNorm(d, cfg.eps, cfg),
            )
            for _ in range(cfg.n_layers_computed)
        )

    def forward(self, pixel_values: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch pos d_in"]:
        """Returns the selected features (CLS dropped under the "default" strategy)."""
        patches = F.conv2d(pixel_values.to(self.w_patch.dtype), self.w_patch, stride=self.cfg.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        cls = self.cls.expand(patches.shape[0], 1, -1)
        pos = self.hook_pos_embed(self.w_pos.expand(patches.shape[0], -1, -1))
        x = self.ln_pre(self.hook_embed(torch.cat([cls, patches], dim=1) + pos))
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


class Projector(nn.Module):
    """`Linear → act → Linear`, mapping selected vision features into the residual stream."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.cfg = cfg
        self.w_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_in))
        self.w_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_model))
        self.b_in = nn.Parameter(torch.empty(cfg.d_model)) if cfg.bias else None
        self.b_out = nn.Parameter(torch.empty(cfg.d_model)) if cfg.bias else None
        self.act = ACTIVATIONS[cfg.act_fn]
        self.hook_in = HookPoint()  # selected vision features
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()
        self.hook_out = HookPoint()  # image features before the merge

    def forward(self, features: Float[Tensor, "batch pos d_in"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(F.linear(self.hook_in(features), self.w_in, self.b_in))
        return self.hook_out(F.linear(self.hook_post(self.act(pre)), self.w_out, self.b_out))
