"""Influence, pruning and scores of an attribution graph, as circuit-tracer defines them.

With `Â = |A| / rowsum(|A|)` (each target's in-edges as shares) and `w` the logit probabilities on the
logit nodes, a node's influence is `w (Â + Â² + …)`: the share of the output it reaches along all paths.
`prune_graph` keeps the nodes carrying `node_threshold` of the total influence (tokens and logits
always), then the edges carrying `edge_threshold` of the edge influence, until every kept feature has an
edge in and out. `graph_scores` gives the replacement score (token influence against error influence)
and the completeness score (the influence-weighted share of in-edges that are not errors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.graphs.graph import Graph


def normalize(matrix: Tensor) -> Tensor:
    """`|A| / rowsum(|A|)` (rows without in-edges stay zero)."""
    a = matrix.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(normalized: Tensor, weights: Tensor, max_iter: int = 1000) -> Tensor:
    """`w (Â + Â² + …)`, summed until the paths run out (the graph is acyclic)."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: is the adjacency matrix acyclic?")


def node_influence(graph: Graph) -> Float[Tensor, " n_nodes"]:
    """Each node's influence on the logits (logit nodes themselves get 0)."""
    return influence(normalize(graph.adjacency_matrix.float()), graph.logit_weights())


def _threshold(scores: Tensor, share: float) -> Tensor:
    """The score above which the highest scores sum to `share` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return ordered[min(int(torch.searchsorted(cumulative, share)), len(ordered) - 1)]


class PruneResult(NamedTuple):
    node_mask: Bool[Tensor, " n_nodes"]
    edge_mask: Bool[Tensor, "n_nodes n_nodes"]
    cumulative_scores: Float[Tensor, " n_nodes"]


def prune_graph(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Keep the nodes and edges that carry most of the influence (see the module docstring).

    Returns:
        `node_mask`, `edge_mask` (`[target, source]`), and each node's cumulative share of influence when
        nodes are sorted by influence (small = among the most influential).
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}.")
    a, w = graph.adjacency_matrix.float(), graph.logit_weights()
    n_keep = graph.n_inputs + graph.n_logits  # tokens (and pixel inputs) and logits, always kept
    infl = influence(normalize(a), w)
    node_mask = infl >= _threshold(infl, node_threshold)
    node_mask[-n_keep:] = True
    pruned = a.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    norm = normalize(pruned)
    edge_scores = norm * (influence(norm, w) + w)[:, None]
    positive = edge_scores[edge_scores > 0]  # the zeros never change the threshold; sorting them is slow
    edge_mask = edge_scores >= (_threshold(positive, edge_threshold) if len(positive) else 1.0)
    previous = None
    while previous is None or not torch.equal(previous, node_mask):
        previous = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:-n_keep] &= edge_mask[:, :-n_keep].any(0)  # features and errors need an edge out
        node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)  # features need an edge in
    order = infl.sort(descending=True)
    cumulative = torch.zeros_like(infl)
    cumulative[order.indices] = order.values.cumsum(0) / order.values.sum().clamp_min(1e-30)
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement, completeness): how much of the computation the features explain, 1 = all of it."""
    norm, w = normalize(graph.adjacency_matrix.float()), graph.logit_weights()
    infl = influence(norm, w)
    errors = slice(graph.error_start, graph.token_start)
    token_infl = infl[graph.token_start : graph.logit_start].sum()
    error_infl = infl[errors].sum()
    replacement = token_infl / (token_infl + error_infl)
    weight = infl + w
    completeness = ((1 - norm[:, errors].sum(1)) * weight).sum() / weight.sum()
    return float(replacement), float(completeness)


def partial_influence(
    rows: Float[Tensor, "n_rows n_cols"], row_nodes: Tensor, logit_probabilities: Tensor, max_iter: int = 128
) -> Float[Tensor, " n_cols"]:
    """Influence of every column from the rows computed so far (rows indexed by their node `row_nodes`,
    logit rows first, in the order of `logit_probabilities`); used to choose which features to attribute next."""
    norm = normalize(rows)
    prod = torch.zeros(rows.shape[1] + len(logit_probabilities))
    prod[rows.shape[1] :] = logit_probabilities
    total = torch.zeros(rows.shape[1])
    for _ in range(max_iter):
        prod_cols = prod[row_nodes] @ norm
        if not prod_cols.any():
            break
        total += prod_cols
        prod = torch.cat([prod_cols, torch.zeros(len(logit_probabilities))])
    return total


def patch_influence(graph: Graph, infl: Tensor | None = None) -> Float[Tensor, "grid grid"]:
    """The influence of each image patch's token node, laid out on the patch grid (row-major)."""
    infl = node_influence(graph) if infl is None else infl
    image = graph.image_token_nodes()
    if not len(image):
        raise ValueError("this graph has no image positions, so there is no patch map.")
    rows, cols, nodes = (torch.as_tensor(image[c].to_numpy().copy()) for c in ("patch_row", "patch_col", "node"))
    out = torch.zeros(int(rows.max()) + 1, int(cols.max()) + 1)
    out[rows, cols] = infl[nodes]
    return out
