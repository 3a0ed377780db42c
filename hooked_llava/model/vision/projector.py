"""The LLaVA projector: `Linear → act → Linear` from the selected vision features into the residual stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from hooked_llava.model.components import ACTIVATIONS, HookPoint
from hooked_llava.model.config import ProjectorConfig


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
