"""Image-aware activation patching and attribution patching between a clean and a corrupted batch.

- `activation.py`: activation patching of the residual, attention outputs, heads and image blocks.
- `attribution.py`: attribution patching, one forward and one backward pass.
- `common.py`: the pair check, the clean cache, image blocks, tidy results.

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.patching.activation import (
    generic_patch,
    patch_attn_out,
    patch_groups,
    patch_heads,
    patch_image_blocks,
    patch_residual,
)
from analyses.patching.attribution import attribute_image_blocks, generic_attribution
from analyses.patching.common import check_pair, image_blocks, to_frame

__all__ = [
    "attribute_image_blocks",
    "check_pair",
    "generic_attribution",
    "generic_patch",
    "image_blocks",
    "patch_attn_out",
    "patch_groups",
    "patch_heads",
    "patch_image_blocks",
    "patch_residual",
    "to_frame",
]
