"""Vision towers and the projector, siblings chosen from the config by `build_tower`.

- `base.py`: the blocks, feature-layer selection and weight views every tower shares;
- `clip.py`: CLIP (LLaVA-1.5, LLaVA-NeXT); `siglip.py`: SigLIP (LLaVA-OneVision, LLaVA-Interleave);
- `projector.py`: the two-layer projector into the language model's residual stream.

Imports only the model's building blocks (`hooked_llava.model.attention`, `components`, `config`,
`weights`), never the model class.
"""

from __future__ import annotations

from torch import nn

from hooked_llava.model.config import VisionConfig


def build_tower(cfg: VisionConfig) -> nn.Module:
    """The vision tower `cfg.tower` names ("clip" or "siglip"), with hooks under `vision.`."""
    from hooked_llava.model.vision.clip import VisionTower
    from hooked_llava.model.vision.siglip import SiglipTower

    towers = {"clip": VisionTower, "siglip": SiglipTower}
    if cfg.tower not in towers:
        raise ValueError(f"unknown vision tower {cfg.tower!r}; HookedLlava implements {sorted(towers)}.")
    return towers[cfg.tower](cfg)
