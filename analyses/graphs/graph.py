"""The attribution graph: circuit-tracer's fields, plus where each position sits in the image.

Nodes are ordered `[selected features, errors (layer, pos), tokens (pos), logits]`; the adjacency
matrix has one row per target and one column per source (`A[target, source]`); error and token rows
are zero. `positions` says, per sequence position, its token and, at image positions, the patch's grid
cell and pixel box, so that token nodes at image positions are read as image patches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class Graph:
    """An attribution graph of one prompt (see the module docstring for the node order).

    Attributes:
        input_string: the prompt's text (image patches as `<image>`).
        input_tokens: `[n_pos]` token ids.
        logit_targets: the target tokens' ids, most probable first.
        logit_tokens: their strings.
        logit_probabilities: `[n_logits]` their probabilities.
        active_features: `[nnz, 3]` (layer, pos, feature) of every active transcoder feature.
        activation_values: `[nnz]` their activations.
        selected_features: indices into `active_features` of the feature nodes, in node order.
        adjacency_matrix: `[n_nodes, n_nodes]` direct effects, rows = targets, columns = sources.
        n_layers: layers of the model (error nodes per position).
        positions: one row per position: `pos`, `token`, `is_image`, `patch_row`, `patch_col`, `x0, y0, x1, y1`.
        scan: the transcoder set's identifier.
        labels: optional per-(layer, feature) ground-truth labels (`clerp`, `precision`), see `labels.py`.
    """

    input_string: str
    input_tokens: Int[Tensor, " n_pos"]
    logit_targets: list[int]
    logit_tokens: list[str]
    logit_probabilities: Float[Tensor, " n_logits"]
    active_features: Int[Tensor, "nnz 3"]
    activation_values: Float[Tensor, " nnz"]
    selected_features: Int[Tensor, " n_features"]
    adjacency_matrix: Float[Tensor, "n_nodes n_nodes"]
    n_layers: int
    positions: pd.DataFrame
    scan: str | None = None
    labels: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def error_node(self, layer: int, pos: int) -> int:
        """Index of the error node of `layer` at `pos`."""
        return self.error_start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        """Index of the token (embedding) node at `pos`."""
        return self.token_start + pos

    def feature_nodes(self) -> pd.DataFrame:
        """One row per feature node, in node order: `node`, `layer`, `pos`, `feature`, `activation`."""
        idx = self.active_features[self.selected_features]
        return pd.DataFrame(
            dict(
                node=range(self.n_features),
                layer=idx[:, 0].tolist(),
                pos=idx[:, 1].tolist(),
                feature=idx[:, 2].tolist(),
                activation=self.activation_values[self.selected_features].tolist(),
            )
        )

    def logit_weights(self) -> Float[Tensor, " n_nodes"]:
        """The logit probabilities on the logit nodes, zeros elsewhere."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_start :] = self.logit_probabilities.float()
        return w

    def image_token_nodes(self) -> pd.DataFrame:
        """The token nodes at image positions with their patch: `node`, `pos`, `patch_row`, `patch_col`, box."""
        img = self.positions[self.positions.is_image].copy()
        img.insert(0, "node", [self.token_node(int(p)) for p in img.pos])
        return img.reset_index(drop=True)


def position_table(inputs: Any, tokens: list[str]) -> pd.DataFrame:
    """Per position of row 0 of `inputs`: token, whether it is an image patch, its grid cell and pixel box."""
    n = inputs.input_ids.shape[1]
    rc = inputs.patch_rc()[0].cpu()
    table = pd.DataFrame(
        dict(
            pos=range(n),
            token=tokens,
            is_image=inputs.image_mask[0].cpu().tolist(),
            patch_row=rc[:, 0].tolist(),
            patch_col=rc[:, 1].tolist(),
        )
    )
    boxes = pd.DataFrame(index=range(n), columns=["x0", "y0", "x1", "y1"], dtype=float)
    image_map = inputs.image_map()
    if len(image_map):
        rows = image_map[image_map.row == 0]
        boxes.loc[rows.pos.to_numpy(), ["x0", "y0", "x1", "y1"]] = rows[["x0", "y0", "x1", "y1"]].to_numpy()
    return pd.concat([table, boxes], axis=1)
