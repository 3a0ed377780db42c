"""Attribution graphs through transcoders, from image patches to the answer (circuit-tracer's semantics).

- `attribute` (attribution.py, on replacement.py): the graph of one prompt, a `Graph` (graph.py);
- `node_influence`, `prune_graph`, `graph_scores` (influence.py);
- `intervene` (interventions.py): the model's logits with chosen features set;
- `feature_labels`, `label_graph` (labels.py): ground-truth labels of transcoder features on the Shapes world;
- `to_circuit_tracer_json` (export.py): circuit-tracer's frontend files; `plot_graph` (plot.py): a static figure;
- `attribute_through_vision` (vision.py, on vision_replacement.py): the graph continued through the projector
  and the vision tower, whose image inputs are the patches' pixels.

This package uses only the model's public hooks and the transcoders' public methods.
"""

from analyses.graphs.attribution import attribute
from analyses.graphs.export import to_circuit_tracer_json
from analyses.graphs.graph import Graph
from analyses.graphs.influence import PruneResult, graph_scores, node_influence, patch_influence, prune_graph
from analyses.graphs.interventions import intervene
from analyses.graphs.labels import feature_labels, label_graph, node_labels
from analyses.graphs.plot import plot_graph, top_features
from analyses.graphs.vision import attribute_through_vision

__all__ = [
    "Graph",
    "PruneResult",
    "attribute",
    "attribute_through_vision",
    "feature_labels",
    "graph_scores",
    "intervene",
    "label_graph",
    "node_influence",
    "node_labels",
    "patch_influence",
    "plot_graph",
    "prune_graph",
    "to_circuit_tracer_json",
    "top_features",
]
