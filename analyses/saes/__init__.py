"""Analyses of SAE features on `HookedSAELlava` and their ground truth on the Shapes world.

- `features.py`: feature activations, patch maps, top activations, edits and attribution.
- `groundtruth.py`: every unit scored against the Shapes world's patch attributes.
- `card.py`: evaluate an SAE on held-out Shapes questions and write its model card
  (`python -m analyses.saes.card`).

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.saes.features import (
    answer_log_prob,
    edit_features,
    feature_acts,
    feature_attribution,
    feature_patch_map,
    top_activations,
)
from analyses.saes.groundtruth import (
    attribute_names,
    best_attributes,
    feature_families,
    ground_truth_scores,
    oracle_precision,
    patch_activations,
    patch_attributes,
    precision_recall,
    summarize,
    unit_values,
)

__all__ = [
    "answer_log_prob",
    "attribute_names",
    "best_attributes",
    "edit_features",
    "feature_acts",
    "feature_attribution",
    "feature_families",
    "feature_patch_map",
    "ground_truth_scores",
    "oracle_precision",
    "patch_activations",
    "patch_attributes",
    "precision_recall",
    "summarize",
    "top_activations",
    "unit_values",
]
