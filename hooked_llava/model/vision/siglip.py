"""The SigLIP vision tower (LLaVA-OneVision, LLaVA-Interleave), with hooks.

As HF's `SiglipVisionModel`: a patch conv with bias, learned position embeddings, no CLS token and
no pre-LayerNorm, then pre-norm blocks (`gelu_pytorch_tanh` MLPs). LLaVA reads hidden states, which
HF takes before the post-LayerNorm, so neither the post-LayerNorm nor the attention-pooling head
reaches the language model and neither is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_llava.model.components import HookPoint
from hooked_llava.model.config import VisionConfig
from hooked_llava.model.vision.base import TowerBase


class SiglipTower(TowerBase):
    """SigLIP ViT: patch conv (with bias) plus positions, then `n_layers_computed` blocks."""

    def __init__(self, cfg: VisionConfig):
        super().__init__(cfg)
        d, p = cfg.d_model, cfg.patch_size
        self.w_patch = nn.Parameter(torch.empty(d, cfg.n_channels, p, p))
        self.b_patch = nn.Parameter(torch.empty(d))
        self.w_pos = nn.Parameter(torch.empty(cfg.n_ctx, d))
        self.hook_patch_embed = HookPoint()  # [batch, n_patches, d_model]
        self.hook_pos_embed = HookPoint()  # [batch, n_patches, d_model]
        self.hook_embed = HookPoint()  # patches + positions: the residual entering block 0
        self.blocks = self._build_blocks()

    def forward(self, pixel_values: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch _ d_in"]:
        """Returns the selected features (every patch under "full"; HF's "default" drops the first)."""
        patches = F.conv2d(pixel_values.to(self.w_patch.dtype), self.w_patch, self.b_patch, stride=self.cfg.patch_size)
        patches = self.hook_patch_embed(patches.flatten(2).transpose(1, 2))
        pos = self.hook_pos_embed(self.w_pos.expand(patches.shape[0], -1, -1))
        return self.run_blocks(self.hook_embed(patches + pos))
