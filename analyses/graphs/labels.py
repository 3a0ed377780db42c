"""Ground-truth labels of transcoder features on the Shapes world, for the graph's nodes (`clerp`).

Every feature is scored against the world's attributes with the SAE ground-truth scoring
(`analyses.saes.groundtruth`: precision and recall of "active > 0" against each attribute, best
attribute = the most precise at recall ≥ 0.5, else the best F1). The units are read at two kinds of
positions of held-out colour questions:

- image patches: the scene's attributes of the object at the patch (object, colour, shape, side;
  `groundtruth.patch_attributes`) and whether it is the object the question asks about (`asked object`);
- the last position: the question's object (`asks=<shape>`) and the answer word (`answer=<colour>`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.graphs.graph import Graph
from analyses.patch_maps.grid import grid_positions
from analyses.saes import groundtruth as gt
from hooked_llava.shapes import COLORS, SHAPES, ShapesWorld
from hooked_llava.shapes.evaluate import EVAL_SEED  # the held-out world, never used for training


def label_names() -> list[str]:
    """The attributes scored: the SAE ground truth's, then the question's."""
    return [
        *gt.attribute_names(),
        "asked object",
        *(f"asks={s}" for s in SHAPES),
        *(f"answer={c}" for c in COLORS),
    ]


def _asked(example: Any) -> int:
    """Index of the object the colour question asks about."""
    return next(i for i, o in enumerate(example.scene.objects) if o.shape in example.question)


def attributes(world: ShapesWorld, examples: Sequence[Any]) -> Bool[Tensor, "row attribute"]:
    """Per example, its 64 patches (row-major) then its last position: the ground truth of each attribute."""
    names, n_cells = label_names(), world.grid**2
    base = gt.patch_attributes(world, [e.scene for e in examples]).reshape(len(examples), n_cells, -1)
    out = torch.zeros(len(examples), n_cells + 1, len(names), dtype=torch.bool)
    out[:, :n_cells, : base.shape[-1]] = base
    for i, e in enumerate(examples):
        out[i, world.object_patches(e.scene)[_asked(e)], names.index("asked object")] = True
        shape = e.scene.objects[_asked(e)].shape
        out[i, n_cells, names.index(f"asks={shape}")] = True
        out[i, n_cells, names.index(f"answer={e.answer}")] = True
    return out.flatten(0, 1)


@torch.no_grad()
def feature_activations(
    model: Any, ts: Any, examples: Sequence[Any], batch_size: int = 32
) -> list[Float[Tensor, "row feature"]]:
    """Per layer, every feature's activation at the rows of `attributes` (patches, then the last position)."""
    per_layer: list[list[Tensor]] = [[] for _ in range(len(ts))]
    names = [ts.input_hook(layer) for layer in range(len(ts))]
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = model.prepare(images=[e.image for e in chunk], prompts=[e.prompt for e in chunk])
        _, cache = model.run_with_cache(inputs, names_filter=names)
        cells = torch.cat([grid_positions(inputs), inputs.last[:, None]], 1)
        for layer, name in enumerate(names):
            x = cache[name].gather(1, cells[..., None].expand(-1, -1, cache[name].shape[-1]).to(cache[name].device))
            per_layer[layer].append(ts[layer].encode(x).flatten(0, 1).float().cpu())
    return [torch.cat(chunks) for chunks in per_layer]


def feature_labels(model: Any, ts: Any, n_scenes: int = 200, seed: int = EVAL_SEED) -> pd.DataFrame:
    """Every feature's best ground-truth attribute on held-out colour questions.

    Returns:
        One row per (layer, feature): `attribute`, `precision`, `recall`, `monosemantic`, `active_rows`
        and `clerp` (the attribute and its precision, "" for a feature never active here).
    """
    world = ShapesWorld(seed)
    examples = [world.example(i, "Colour") for i in range(n_scenes)]
    attrs = attributes(world, examples)
    tables = []
    for layer, acts in enumerate(feature_activations(model, ts, examples)):
        fires = acts > 0
        table = gt.best_attributes(*gt.precision_recall(fires, attrs), "transcoder", label_names())
        table.insert(0, "layer", layer)
        table = table.rename(columns={"unit": "feature"})
        table["active_rows"] = fires.sum(0).tolist()
        tables.append(table)
    out = pd.concat(tables, ignore_index=True).drop(columns="method")
    out["clerp"] = [f"{a} (p={p:.2f})" if n else "" for a, p, n in zip(out.attribute, out.precision, out.active_rows)]
    return out


def label_graph(graph: Graph, labels: pd.DataFrame) -> Graph:
    """Attach the labels to the graph (its feature nodes then carry `clerp` and `precision`); returns it."""
    graph.labels = labels[["layer", "feature", "attribute", "precision", "clerp"]]
    return graph


def node_labels(graph: Graph) -> pd.DataFrame:
    """The feature nodes (`Graph.feature_nodes`) with their label's `clerp` and `precision` (if labelled)."""
    nodes = graph.feature_nodes()
    if graph.labels is None:
        return nodes.assign(clerp="", precision=float("nan"))
    out = nodes.merge(graph.labels[["layer", "feature", "clerp", "precision"]], on=["layer", "feature"], how="left")
    if "tower" in out:  # the labels are the language model's transcoders'; vision-side features have none
        out.loc[out.tower != "language", ["clerp", "precision"]] = ["", float("nan")]
    return out
