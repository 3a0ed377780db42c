"""The logit lens and visual embeddings in vocabulary space (study A).

- `logit.py`: `logit_lens`, intermediate residuals through the final norm and unembedding; tidy tables.
- `embedding.py`: each image position's projector output compared with `W_E` or read through `W_U`.

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.lens.embedding import embedding_projection, layer0_inputs, mrr, reciprocal_ranks, vocab_scores
from analyses.lens.logit import logit_lens, residual_stack, token_ranks, top_k_table, word_forms

__all__ = [
    "embedding_projection",
    "layer0_inputs",
    "logit_lens",
    "mrr",
    "reciprocal_ranks",
    "residual_stack",
    "token_ranks",
    "top_k_table",
    "vocab_scores",
    "word_forms",
]
