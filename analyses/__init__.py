"""Analyses built on HookedLlava.

Each analysis is a function `(model, inputs, ...)` returning labelled tensors or tidy pandas
DataFrames, and leaves the model without hooks. Plotting lives in `analyses.plotting.figures`.
"""

from analyses.ablation import ablate_heads, head_ablation_scan
from analyses.attribution.contributions import FrozenReadout
from analyses.attribution.scores import direct_logit_attribution, log_prob_increase, top_heads, top_units
from analyses.information_flow.attention_knockout import knockout, knockout_sweep
from analyses.information_flow.stats import summarize_knockout
from analyses.lens.embedding import embedding_projection, mrr, reciprocal_ranks, vocab_scores
from analyses.lens.logit import logit_lens, token_ranks, top_k_table, word_forms
from analyses.patch_maps.maps import patch_importance
from analyses.patch_maps.occlusion import faithfulness
from analyses.patching.activation import (
    attribute_attn_out,
    attribute_heads,
    attribute_image_blocks,
    attribute_residual,
    patch_attn_out,
    patch_heads,
    patch_image_blocks,
    patch_residual,
)
from analyses.plotting.figures import plot_head_scores, plot_logit_lens, plot_patch_heatmap
from analyses.plotting.flows import plot_head_scan, plot_knockout, plot_patching, plot_sweep
from analyses.readout import lens_positions

__all__ = [
    "ablate_heads",
    "attribute_attn_out",
    "attribute_heads",
    "attribute_image_blocks",
    "attribute_residual",
    "head_ablation_scan",
    "knockout",
    "knockout_sweep",
    "patch_attn_out",
    "patch_heads",
    "patch_image_blocks",
    "patch_residual",
    "plot_head_scan",
    "plot_knockout",
    "plot_patching",
    "plot_sweep",
    "summarize_knockout",
    "FrozenReadout",
    "direct_logit_attribution",
    "embedding_projection",
    "faithfulness",
    "lens_positions",
    "log_prob_increase",
    "logit_lens",
    "mrr",
    "patch_importance",
    "plot_head_scores",
    "plot_logit_lens",
    "plot_patch_heatmap",
    "reciprocal_ranks",
    "token_ranks",
    "top_heads",
    "top_k_table",
    "top_units",
    "vocab_scores",
    "word_forms",
]
