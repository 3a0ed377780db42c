"""A static figure of a graph: the image with each patch's influence on the answer, beside the top features.

Plotting only: the values come from `influence.patch_influence` and `top_features` (computed, not drawn here).
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.graphs.graph import Graph
from analyses.graphs.influence import node_influence
from analyses.graphs.labels import node_labels

_PREFIX = {"language": "L", "vision": "V", "projector": "P"}  # "P3": the projector (the last vision stage)


def top_features(graph: Graph, n: int = 10) -> pd.DataFrame:
    """The `n` most influential feature nodes with their position, label (`clerp`) and influence."""
    infl = node_influence(graph)[: graph.n_features]
    table = node_labels(graph).assign(influence=infl.tolist())
    table["token"] = graph.positions.token.to_numpy()[table.pos.to_numpy() % graph.n_pos]
    if graph.vision_positions is not None:  # vision-side features: `pos` is the vision position
        vp = graph.vision_positions
        where = ["cls" if k == "cls" else f"img {r},{c}" for k, r, c in zip(vp.kind, vp.patch_row, vp.patch_col)]
        vision = (table.tower != "language").to_numpy()
        table.loc[vision, "token"] = np.asarray(where, dtype=object)[table.pos.to_numpy()[vision]]
    return table.sort_values("influence", ascending=False).head(n).reset_index(drop=True)


def plot_graph(image: Any, patch_map: Any, features: pd.DataFrame, title: str = "") -> Any:
    """Draw the image with the patch influence map over it, and the top features as labelled bars.

    Args:
        image: the PIL image (or array) the prompt shows.
        patch_map: `[grid, grid]` influence of each patch (`patch_influence`).
        features: `top_features(graph)`.
        title: the figure's title (e.g. the question and answer).

    Returns:
        The matplotlib figure.
    """
    fig, (ax_img, ax_bar) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1, 1.4]))
    pixels = np.asarray(image)
    grid = np.asarray(patch_map, dtype=float)
    ax_img.imshow(pixels)
    h, w = pixels.shape[:2]
    shown = ax_img.imshow(grid, cmap="magma", alpha=0.55, extent=(0, w, h, 0), interpolation="nearest")
    fig.colorbar(shown, ax=ax_img, fraction=0.046, label="influence on the answer")
    ax_img.set_title("image patches (token nodes)")
    ax_img.axis("off")
    names = [
        f"{_PREFIX[getattr(r, 'tower', 'language')]}{r.layer} f{r.feature} @{r.token}"
        + (f" — {r.clerp}" if isinstance(r.clerp, str) and r.clerp else "")
        for r in features.itertuples()
    ]
    ax_bar.barh(range(len(features)), features.influence.to_numpy(), color="tab:purple")
    ax_bar.set_yticks(range(len(features)), names, fontsize=8)
    ax_bar.invert_yaxis()
    ax_bar.set_xlabel("influence on the logits")
    ax_bar.set_title("most influential features")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
