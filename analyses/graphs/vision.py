"""`attribute_through_vision`: attribution graphs whose image inputs are patches' pixels.

The graph of `attribute` (attribution.py) stops at the merged embeddings: an image patch's input node is
what the projector wrote there. Here the graph continues through the projector and the vision tower
(`vision_replacement.py`): the projector and every vision MLP are replaced by transcoders
(`load_transcoders("shapes-llava-vision")`), the tower's attention patterns and norms are frozen, and
the image's input nodes are what enters the tower at each patch (the patch conv of its pixels plus its
position embedding), one per patch, plus one for CLS. The node order and the meaning of edges,
influence, pruning and scores are circuit-tracer's, extended as `graph.py` says.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd
import torch

from analyses.graphs.attribution import assemble_graph, feature_rows_by_influence, logit_targets
from analyses.graphs.graph import Graph
from analyses.graphs.replacement import clean_run
from analyses.graphs.vision_replacement import ThroughVisionModel, VisionCleanRun, check_vision_model, vision_clean_run


def vision_position_table(positions: pd.DataFrame, n_vpos: int) -> pd.DataFrame:
    """Per vision position: `vpos`, `kind` (cls / patch), the patch's grid cell, `lm_pos` and pixel box.

    Patch `j` (vision position `1 + j`) is the `j`-th image position of the sequence (the merge fills the
    placeholders in order); its cell and box are that position's (`graph.position_table`)."""
    image = positions[positions.is_image].reset_index(drop=True)
    if len(image) != n_vpos - 1:
        raise ValueError(f"the tower has {n_vpos - 1} patches but row 0 has {len(image)} image positions.")
    cls = pd.DataFrame(dict(patch_row=[-1], patch_col=[-1], pos=[int(image.pos[0])]))
    table = pd.concat([cls, image[["patch_row", "patch_col", "pos", "x0", "y0", "x1", "y1"]]], ignore_index=True)
    table = table.rename(columns={"pos": "lm_pos"})
    table.insert(0, "kind", ["cls"] + ["patch"] * (n_vpos - 1))
    table.insert(0, "vpos", range(n_vpos))
    return table


def attribute_through_vision(
    model: Any,
    inputs: Any,
    ts: Any,
    vision_ts: Any,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    verbose: bool = False,
) -> Graph:
    """The attribution graph of row 0 of `inputs` from the image's pixels (and the text tokens) to the logits.

    Args:
        model: the HookedLlava (LLaVA-1.5 packing, CLIP tower).
        inputs: the prompt with one image (`model.prepare`); only row 0 is attributed.
        ts: the language model's transcoders.
        vision_ts: the vision MLPs' and the projector's transcoders (`load_transcoders("shapes-llava-vision")`).
        max_n_logits, desired_logit_prob: the logit targets, as in `attribute`.
        max_feature_nodes: most feature nodes, language and vision side together (the most influential first);
            None for every active feature.
        batch_size: targets per backward pass.
        update_interval: batches between re-rankings of the features when `max_feature_nodes` caps them.
        verbose: show a progress bar.

    Returns:
        The `Graph` with its vision-side fields filled (node order in `graph.py`'s docstring).
    """
    if len(ts) != model.cfg.n_layers:
        raise ValueError(f"the transcoder set has {len(ts)} layers but the model has {model.cfg.n_layers}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    check_vision_model(model, vision_ts)
    clean = clean_run(model, inputs, ts)
    vclean = vision_clean_run(model, inputs, vision_ts)
    targets, probs = logit_targets(clean.logits, max_n_logits, desired_logit_prob)
    frozen = ThroughVisionModel(model, inputs, ts, vision_ts, clean, vclean, batch_size)
    n_lm, n_vpos = len(clean.active), len(vclean.embed)
    nnz = n_lm + len(vclean.active)
    n_cols = nnz + (len(ts) + 1) * clean.embed.shape[0] + (len(vision_ts) + 1) * n_vpos
    logit_rows = torch.cat(
        [frozen.rows(frozen.logit_reading[torch.arange(len(c)), c]) for c in torch.tensor(targets).split(batch_size)]
    )
    n_sel = nnz if max_feature_nodes is None else min(max_feature_nodes, nnz)
    rows, order = feature_rows_by_influence(
        frozen.rows, frozen.readings, nnz, logit_rows, probs, n_sel, batch_size, update_interval, verbose
    )
    graph = assemble_graph(model, inputs, ts, _joint(clean, vclean), targets, probs, logit_rows, rows, order, n_cols)
    selected = graph.selected_features
    return dataclasses.replace(
        graph,
        active_features=clean.active.cpu(),
        activation_values=clean.values.cpu(),
        selected_features=selected[selected < n_lm],
        vision_active_features=vclean.active.cpu(),
        vision_activation_values=vclean.values.cpu(),
        vision_selected_features=selected[selected >= n_lm] - n_lm,
        n_vision_layers=len(vision_ts),
        vision_positions=vision_position_table(graph.positions, n_vpos),
        vision_scan=vision_ts.scan,
    )


def _joint(clean: Any, vclean: VisionCleanRun) -> Any:
    """The clean run with the vision features appended to its active list (what `assemble_graph` counts)."""
    return dataclasses.replace(
        clean,
        active=torch.cat([clean.active, vclean.active]),
        values=torch.cat([clean.values, vclean.values]),
        pre_activations=torch.cat([clean.pre_activations, vclean.pre_activations]),
    )
