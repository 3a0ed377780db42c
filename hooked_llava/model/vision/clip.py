"""The CLIP vision tower (LLaVA-1.5, LLaVA-NeXT), with hooks: patch conv without bias, a CLS
token, learned positions and a pre-LayerNorm before the blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_llava.model.components import HookPoint, LayerNorm
from hooked_llava.model.config import VisionConfig
from hooked_llava.model.vision.base import TowerBase


class VisionTower(TowerBase):
    """CLIP ViT: patch conv, CLS and positions, pre-LayerNorm, then `n_layers_computed` blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        d = cfg.d_model
        self.w_patch = nn.Parameter(torch.empty(d, cfg.n_channels, cfg.patch_size, cfg.patch_size))
        self.cls = nn.Parameter(torch.empty(d))
        self.w_pos = nn.Parameter(torch.empty(cfg.n_ctx, d))
        self.hook_patch_embed = HookPoint()  # [batch, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, 1 + n_patches, d_model]
        self.hook_embed = HookPoint()  # CLS + patches + positions, before ln_pre
        self.ln_pre = LayerNorm(d, cfg.eps, cfg)
        self.blocks = self._build_blocks()

    def forward(self, pixel_values: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch pos d_in"]:
        """Returns the selected features (CLS dropped under the "default" strategy)."""
        patches = F.conv2d(pixel_values.to(self.w_patch.dtype), self.w_patch, stride=self.cfg.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        cls = self.cls.expand(patches.shape[0], 1, -1)
        pos = self.hook_pos_embed(self.w_pos.expand(patches.shape[0], -1, -1))
        x = self.ln_pre(self.hook_embed(torch.cat([cls, patches], dim=1) + pos))
        return self.run_blocks(x)
