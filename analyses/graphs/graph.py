"""The attribution graph: circuit-tracer's fields, plus where each position sits in the image.

Nodes are ordered `[selected features, errors (layer, pos), tokens (pos), logits]`; the adjacency
matrix has one row per target and one column per source (`A[target, source]`); error and token rows
are zero. `positions` says, per sequence position, its token and, at image positions, the patch's grid
cell and pixel box, so that token nodes at image positions are read as image patches.

A graph that continues through the projector and the vision tower (`vision.attribute_through_vision`)
has vision-side nodes in each of circuit-tracer's groups, after the language model's:
`[LM features, vision features, LM errors (layer, pos), vision errors (stage, vpos), tokens (pos),
pixel inputs (vpos), logits]`. A vision *stage* is a vision block's MLP (stages `0 .. n-2`) or the
projector (the last stage); `vpos` is the vision tower's position (0 = CLS, `1 + j` = patch `j`; the
projector's patch `j` sits at `vpos = 1 + j`, and its CLS error is a zero node). The pixel input node at
`vpos` is what enters the tower there (`vision.hook_embed`: the patch conv of the patch's pixels plus its
position embedding; at CLS, the class embedding plus its position embedding). Token nodes at image
positions are then zero (the projector writes there), and are kept only so that `token_node(pos)` stays.
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
        vision_active_features: `[nnz_v, 3]` (stage, vpos, feature) of every active vision-side feature
            (through-vision graphs only; empty otherwise).
        vision_activation_values: `[nnz_v]` their activations.
        vision_selected_features: indices into `vision_active_features` of the vision feature nodes.
        n_vision_layers: vision stages (the vision MLPs, then the projector); 0 without the vision side.
        vision_positions: one row per vision position: `vpos`, `kind` ("cls" or "patch"), `patch_row`,
            `patch_col`, `lm_pos` (the sequence position the patch's projection is merged at; the first
            image position for CLS), `x0, y0, x1, y1`; None without the vision side.
        vision_scan: the vision transcoder set's identifier.
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
    vision_active_features: Int[Tensor, "nnz_v 3"] = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.long))
    vision_activation_values: Float[Tensor, " nnz_v"] = field(default_factory=lambda: torch.zeros(0))
    vision_selected_features: Int[Tensor, " n_vision_features"] = field(
        default_factory=lambda: torch.zeros(0, dtype=torch.long)
    )
    n_vision_layers: int = 0
    vision_positions: pd.DataFrame | None = field(default=None, repr=False)
    vision_scan: str | None = None

    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_vpos(self) -> int:
        """Vision positions (0 without the vision side)."""
        return 0 if self.vision_positions is None else len(self.vision_positions)

    @property
    def n_lm_features(self) -> int:
        return len(self.selected_features)

    @property
    def n_features(self) -> int:
        return len(self.selected_features) + len(self.vision_selected_features)

    @property
    def n_inputs(self) -> int:
        """Input nodes: one token node per position, and one pixel node per vision position."""
        return self.n_pos + self.n_vpos

    @property
    def n_logits(self) -> int:
        return len(self.logit_targets)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def vision_error_start(self) -> int:
        return self.error_start + self.n_layers * self.n_pos

    @property
    def token_start(self) -> int:
        return self.vision_error_start + self.n_vision_layers * self.n_vpos

    @property
    def pixel_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def logit_start(self) -> int:
        return self.pixel_start + self.n_vpos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits

    def error_node(self, layer: int, pos: int) -> int:
        """Index of the error node of `layer` at `pos`."""
        return self.error_start + layer * self.n_pos + pos

    def token_node(self, pos: int) -> int:
        """Index of the token (embedding) node at `pos`."""
        return self.token_start + pos

    def vision_error_node(self, stage: int, vpos: int) -> int:
        """Index of the error node of vision stage `stage` (the projector is the last) at vision position `vpos`."""
        return self.vision_error_start + stage * self.n_vpos + vpos

    def pixel_node(self, vpos: int) -> int:
        """Index of the pixel input node at vision position `vpos` (0 = CLS)."""
        return self.pixel_start + vpos

    def feature_nodes(self) -> pd.DataFrame:
        """One row per feature node, in node order: `node`, `layer`, `pos`, `feature`, `activation`; with the
        vision side also `tower` ("language", "vision" or "projector"; `layer` and `pos` of a vision-side
        feature are its stage and vision position)."""
        idx = self.active_features[self.selected_features]
        table = pd.DataFrame(
            dict(
                node=range(self.n_lm_features),
                layer=idx[:, 0].tolist(),
                pos=idx[:, 1].tolist(),
                feature=idx[:, 2].tolist(),
                activation=self.activation_values[self.selected_features].tolist(),
            )
        )
        if self.vision_positions is None:
            return table
        vidx = self.vision_active_features[self.vision_selected_features]
        vision = pd.DataFrame(
            dict(
                node=range(self.n_lm_features, self.n_features),
                layer=vidx[:, 0].tolist(),
                pos=vidx[:, 1].tolist(),
                feature=vidx[:, 2].tolist(),
                activation=self.vision_activation_values[self.vision_selected_features].tolist(),
            )
        )
        vision["tower"] = ["projector" if s == self.n_vision_layers - 1 else "vision" for s in vision.layer]
        return pd.concat([table.assign(tower="language"), vision], ignore_index=True)

    def logit_weights(self) -> Float[Tensor, " n_nodes"]:
        """The logit probabilities on the logit nodes, zeros elsewhere."""
        w = torch.zeros(self.n_nodes)
        w[self.logit_start :] = self.logit_probabilities.float()
        return w

    def image_token_nodes(self) -> pd.DataFrame:
        """The input nodes of the image's patches: `node`, `pos`, `patch_row`, `patch_col`, box. These are the token
        nodes at image positions, or, in a through-vision graph, the pixel nodes of the patches (then `pos` is
        the sequence position the patch is merged at, and `vpos` its vision position)."""
        if self.vision_positions is not None:
            patches = self.vision_positions[self.vision_positions.kind == "patch"]
            table = patches.rename(columns={"lm_pos": "pos"})
            table.insert(0, "node", [self.pixel_node(int(v)) for v in patches.vpos])
            return table.reset_index(drop=True)
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
