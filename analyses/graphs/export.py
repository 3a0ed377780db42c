"""Circuit-tracer's frontend files for a graph: `{slug}.json` and `graph-metadata.json`.

The graph is pruned (`prune_graph`), and its kept nodes and edges are written with the keys and node
ids circuit-tracer's `create_graph_files` writes: feature `"{layer}_{feature}_{pos}"`, error
`"0_{layer}_{pos}"`, token `"E_{token_id}_{pos}"`, logit `"{n_layers + 1}_{token_id}_{pos}"`; links carry
`weight = A[target, source]`. Image-patch token nodes are labelled by their patch (`clerp = "img r,c"`),
features by their ground-truth label when the graph has labels (`labels.label_graph`).

A through-vision graph (`vision.attribute_through_vision`) adds its vision-side nodes, named after
circuit-tracer's scheme with the stage as layer (`"V{s}"` for vision MLP `s`, `"P"` for the projector)
and the vision position `vpos` in the id: feature `"V{s}_{feature}_{vpos}"`, error `"0_V{s}_{vpos}"`;
pixel inputs are embeddings `"E_{image_token_id}_{pos}"` (the id the patch's token node has in the
language-model graph, which here carries nothing and is not written) and `"E_cls_{pos}"` for CLS. Their
`ctx_idx` is the sequence position the patch is merged at (CLS: the first image position), and they
carry `vision_pos`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.graphs.graph import Graph
from analyses.graphs.influence import prune_graph


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, pos: int, kind: str, js: str, **extra: Any) -> dict[str, Any]:
    node = dict(
        node_id=node_id,
        feature=feature,
        layer=layer,
        ctx_idx=pos,
        feature_type=kind,
        token_prob=0.0,
        is_target_logit=False,
        run_idx=0,
        reverse_ctx_idx=0,
        jsNodeId=js,
        clerp="",
        influence=None,
        activation=None,
    )
    node.update(extra)
    return node


def _labels(graph: Graph) -> dict[tuple[int, int], str]:
    if graph.labels is None:
        return {}
    table: pd.DataFrame = graph.labels
    return {(int(r.layer), int(r.feature)): str(r.clerp) for r in table.itertuples()}


def graph_nodes(graph: Graph, keep: Any, cumulative: Any) -> dict[int, dict[str, Any]]:
    """The frontend node of every kept node index (see the module docstring for the ids)."""
    labels, nodes = _labels(graph), {}
    table = graph.positions
    for i in keep.nonzero().flatten().tolist():
        infl = float(cumulative[i])
        vision = _vision_node(graph, i, infl)
        if vision is not None:
            if vision:
                nodes[i] = vision
            continue
        if i < graph.error_start:
            layer, pos, f = graph.active_features[graph.selected_features[i]].tolist()
            act = float(graph.activation_values[graph.selected_features[i]])
            clerp = labels.get((layer, f), "")
            nodes[i] = _node(
                f"{layer}_{f}_{pos}",
                _cantor(layer, f),
                str(layer),
                pos,
                "cross layer transcoder",
                f"{layer}_{f}-0",
                influence=infl,
                activation=act,
                clerp=clerp,
            )
        elif i < graph.token_start:  # language-model errors (vision errors are `_vision_node`'s)
            layer, pos = divmod(i - graph.error_start, graph.n_pos)
            nodes[i] = _node(
                f"0_{layer}_{pos}", -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0", influence=infl
            )
        elif i < graph.pixel_start:
            pos = i - graph.token_start
            tok = int(graph.input_tokens[pos])
            row = table.iloc[pos]
            clerp = f"img {int(row.patch_row)},{int(row.patch_col)}" if bool(row.is_image) else ""
            nodes[i] = _node(
                f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}", influence=infl, clerp=clerp
            )
        else:
            k = i - graph.logit_start
            tok, prob, pos, layer = (
                graph.logit_targets[k],
                float(graph.logit_probabilities[k]),
                graph.n_pos - 1,
                str(graph.n_layers + 1),
            )
            nodes[i] = _node(
                f"{layer}_{tok}_{pos}",
                tok,
                layer,
                pos,
                "logit",
                f"L_{tok}-{pos}",
                token_prob=prob,
                is_target_logit=k == 0,
                clerp=f'Output "{graph.logit_tokens[k]}" (p={prob:.3f})',
            )
    return nodes


def _stage(graph: Graph, stage: int) -> str:
    return "P" if stage == graph.n_vision_layers - 1 else f"V{stage}"


def _vision_node(graph: Graph, i: int, infl: float) -> dict[str, Any] | None:
    """The frontend node of a vision-side node index; `{}` for a token node at an image position of a
    through-vision graph (it carries nothing); None for the nodes `graph_nodes` writes itself."""
    if graph.vision_positions is None:
        return None
    vp = graph.vision_positions
    if graph.n_lm_features <= i < graph.error_start:
        k = int(graph.vision_selected_features[i - graph.n_lm_features])
        stage, vpos, f = graph.vision_active_features[k].tolist()
        layer, act, pos = _stage(graph, stage), float(graph.vision_activation_values[k]), int(vp.lm_pos[vpos])
        kind = "cross layer transcoder"
        return _node(
            f"{layer}_{f}_{vpos}",
            f,
            layer,
            pos,
            kind,
            f"{layer}_{f}-0",
            influence=infl,
            activation=act,
            vision_pos=vpos,
        )
    if graph.vision_error_start <= i < graph.token_start:
        stage, vpos = divmod(i - graph.vision_error_start, graph.n_vpos)
        layer, pos = _stage(graph, stage), int(vp.lm_pos[vpos])
        kind = "mlp reconstruction error"
        return _node(f"0_{layer}_{vpos}", -1, layer, pos, kind, f"{layer}_{vpos}-0", influence=infl, vision_pos=vpos)
    if graph.token_start <= i < graph.pixel_start:
        return {} if bool(graph.positions.is_image.iloc[i - graph.token_start]) else None
    if graph.pixel_start <= i < graph.logit_start:
        row = vp.iloc[i - graph.pixel_start]
        vpos, pos = int(row.vpos), int(row.lm_pos)
        if row.kind == "cls":
            return _node(
                f"E_cls_{pos}",
                -1,
                "E",
                pos,
                "embedding",
                f"E_cls-{pos}",
                influence=infl,
                clerp="img cls",
                vision_pos=vpos,
            )
        tok = int(graph.input_tokens[pos])
        clerp = f"img {int(row.patch_row)},{int(row.patch_col)}"
        return _node(
            f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}", influence=infl, clerp=clerp, vision_pos=vpos
        )
    return None


def to_circuit_tracer_json(
    graph: Graph,
    path: str | Path,
    slug: str = "graph",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
) -> Path:
    """Write `{slug}.json` and add it to `graph-metadata.json` in the folder `path` (created if missing).

    Returns:
        The path of `{slug}.json`.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    nodes = graph_nodes(graph, pruned.node_mask, pruned.cumulative_scores)
    targets, sources = pruned.edge_mask.nonzero(as_tuple=True)
    links = [
        dict(source=nodes[s]["node_id"], target=nodes[t]["node_id"], weight=float(graph.adjacency_matrix[t, s]))
        for t, s in zip(targets.tolist(), sources.tolist())
        if s in nodes and t in nodes
    ]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = dict(
        slug=slug,
        scan=scan or graph.scan or "unknown",
        transcoder_list=[],
        prompt_tokens=graph.positions.token.tolist(),
        prompt=graph.input_string,
        node_threshold=node_threshold,
        schema_version=1,
    )
    qparams = dict(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    out = folder / f"{slug}.json"
    out.write_text(json.dumps(dict(metadata=metadata, qParams=qparams, nodes=used, links=links), indent=2))
    _add_metadata(folder / "graph-metadata.json", metadata)
    return out


def _add_metadata(path: Path, metadata: dict[str, Any]) -> None:
    listing = json.loads(path.read_text()) if path.is_file() else {"graphs": []}
    listing["graphs"] = [g for g in listing["graphs"] if g["slug"] != metadata["slug"]] + [metadata]
    path.write_text(json.dumps(listing, indent=2))
