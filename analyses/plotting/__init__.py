"""Figures for the analyses' results; these functions only draw.

- `figures.py`: logit lens, head scores, patch heatmaps, anyres maps, the processed image.
- `flows.py`: knockout, sweep, head-ablation and patching figures.

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.plotting.figures import (
    plot_anyres_maps,
    plot_head_scores,
    plot_logit_lens,
    plot_patch_heatmap,
    processed_image,
)
from analyses.plotting.flows import plot_head_scan, plot_knockout, plot_patch_grid, plot_patching

__all__ = [
    "plot_anyres_maps",
    "plot_head_scan",
    "plot_head_scores",
    "plot_knockout",
    "plot_logit_lens",
    "plot_patch_grid",
    "plot_patch_heatmap",
    "plot_patching",
    "processed_image",
]
