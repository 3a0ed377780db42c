"""Which image patches matter for the answer: study A's patch tool and its baselines.

- `maps.py`: `patch_importance` (log-probability increase, attention, occlusion).
- `occlusion.py`: occluded log-probabilities and the maps' faithfulness.
- `grid.py`: sequence positions of the LLaVA-1.5 patch grid.
- `anyres.py`: maps for any layout, LLaVA-NeXT tiles included.

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.patch_maps.anyres import anyres_maps, token_importance
from analyses.patch_maps.grid import grid_positions, to_grid
from analyses.patch_maps.maps import patch_importance
from analyses.patch_maps.occlusion import faithfulness, occluded_log_probs

__all__ = [
    "anyres_maps",
    "faithfulness",
    "grid_positions",
    "occluded_log_probs",
    "patch_importance",
    "to_grid",
    "token_importance",
]
