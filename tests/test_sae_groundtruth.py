"""Ground-truth scores of units on Shapes-world patches (`analyses.saes.groundtruth`); needs no SAELens."""

from __future__ import annotations

import pytest
import torch

from analyses.saes.groundtruth import (
    attribute_names,
    best_attributes,
    ground_truth_scores,
    oracle_precision,
    patch_attributes,
    precision_recall,
    summarize,
)
from hooked_llava.shapes import ShapesWorld
from hooked_llava.shapes.scene import horizontal_word


class IdentitySAE:
    """Stands in for an SAE whose features are the input dimensions themselves."""

    def __init__(self, d: int):
        self.W_enc = torch.eye(d)
        self.cfg = type("Cfg", (), {"d_sae": d})()

    def encode(self, x):
        return x @ self.W_enc


def test_patch_attributes_follow_the_worlds_objects():
    world = ShapesWorld(7)
    scenes = [world.scene(i) for i in range(3)]
    attrs = patch_attributes(world, scenes).reshape(3, world.grid**2, -1)
    names = attribute_names()
    for i, scene in enumerate(scenes):
        expected_object = torch.zeros(world.grid**2, dtype=torch.bool)
        for obj, cells in zip(scene.objects, world.object_patches(scene)):
            expected_object[cells] = True
            assert attrs[i, cells, names.index(f"color={obj.color}")].all()
            assert attrs[i, cells, names.index(f"shape={obj.shape}")].all()
            assert attrs[i, cells, names.index(f"side={horizontal_word(obj.center[0])}")].all()
        assert torch.equal(attrs[i, :, names.index("object")], expected_object)
        # each object patch has exactly one colour, one shape and one side; background patches none
        assert torch.equal(attrs[i, :, 1:].sum(-1), 3 * expected_object.long())


def test_precision_and_recall_by_hand():
    fires = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool)
    attrs = torch.tensor([[1], [0], [1], [1]], dtype=torch.bool)
    precision, recall = precision_recall(fires, attrs)
    assert torch.allclose(precision, torch.tensor([[0.5], [0.5]]))
    assert torch.allclose(recall, torch.tensor([[1 / 3], [1 / 3]]))


def test_oracle_threshold_keeps_recall_at_half():
    values = torch.tensor([[5.0], [4.0], [3.0], [2.0], [1.0]])
    attrs = torch.tensor([[1], [0], [1], [1], [1]], dtype=torch.bool)  # four positives: 5, 3, 2, 1
    precision, recall = oracle_precision(values, attrs)
    # recall >= 0.5 needs the top two positives (5, 3): threshold 3 also lets in the negative 4
    assert precision.item() == pytest.approx(2 / 3) and recall.item() == pytest.approx(0.5)


def test_best_attribute_prefers_precision_at_sufficient_recall():
    precision = torch.tensor([[1.0, 0.95, 0.2], [0.5, 0.2, 0.3]])
    recall = torch.tensor([[0.1, 0.6, 1.0], [0.4, 0.3, 0.1]])
    table = best_attributes(precision, recall, "m")
    names = attribute_names()
    assert table.attribute.tolist()[0] == names[1] and table.monosemantic.tolist() == [True, False]
    assert table.attribute.tolist()[1] == names[0]  # no attribute reaches recall 0.5: best F1


def test_an_sae_of_attribute_detectors_is_monosemantic_and_random_directions_are_not():
    world = ShapesWorld(3)
    attrs = patch_attributes(world, [world.scene(i) for i in range(40)])
    acts = attrs.float() + 0.01 * torch.randn(attrs.shape, generator=torch.Generator().manual_seed(0)).abs()
    acts = acts * (acts > 0.5)  # features fire exactly on their attribute's patches
    scores = ground_truth_scores(IdentitySAE(acts.shape[1]), acts, attrs)
    sae = scores[scores.method == "sae"]
    present = [n for n, any_ in zip(attribute_names(), attrs.any(0).tolist()) if any_]
    assert sorted(sae.attribute) == sorted(present) and sae.monosemantic.all()
    per_method, per_attr = summarize(scores)
    counts = per_method.set_index("method")
    assert counts.loc["sae", "monosemantic"] == len(present) == counts.loc["sae", "attributes_captured"]
    assert counts.loc["random (oracle threshold)", "attributes_captured"] < len(present)
    assert per_attr.set_index("attribute").loc[present, "sae"].eq(1).all()


def test_feature_families_cover_an_attribute_together():
    from analyses.saes.groundtruth import feature_families

    attrs = torch.zeros(6, len(attribute_names()), dtype=torch.bool)
    attrs[:4, 0] = True  # "object" on patches 0-3
    fires = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    table = feature_families(fires, attrs).set_index("attribute")
    # units 0 and 1 are precise for "object" (1/1, 2/2); unit 2 is not (1/2): the family covers 3 of 4 patches
    assert table.loc["object"].tolist() == [2, 1.0, 0.75]
    assert table.loc["color=red", "features"] == 0 and table.loc["color=red", "family_recall"] == 0
