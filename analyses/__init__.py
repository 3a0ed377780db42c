"""Analyses built on HookedLlava.

Each analysis is a function `(model, inputs, ...)` returning labelled tensors or tidy pandas
DataFrames, and leaves the model without hooks. Plotting lives in `analyses.plotting`.
"""

from .attribution import FrozenReadout, direct_logit_attribution, log_prob_increase, top_heads, top_units
from .embedding import embedding_projection, mrr, reciprocal_ranks, vocab_scores
from .logit_lens import lens_positions, logit_lens, token_ranks, top_k_table, word_forms
from .patch_importance import faithfulness, patch_importance
from .plotting import plot_head_scores, plot_logit_lens, plot_patch_heatmap

# other modules

__all__ = [
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
