"""The figures draw what they are given: axes, images and lines checked, files written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.testing import assert_close

from analyses.plotting.figures import (
    CLIP_MEAN,
    CLIP_STD,
    plot_head_scores,
    plot_logit_lens,
    plot_patch_heatmap,
    processed_image,
)


@pytest.fixture(scope="module")
def setup(tiny, images):
    model, _ = tiny
    inputs = model.prepare(images=images, prompts=["USER: <image>\nIs it red?\nASSISTANT:"] * 2)
    return model, inputs, images


def saved(fig, path):
    fig.savefig(path)
    return path.stat().st_size


def test_logit_lens_lines(tmp_path):
    table = pd.DataFrame(
        {
            "layer": [0, 1, 2] * 3,
            "batch": [0] * 6 + [1] * 3,
            "position": [7] * 9,
            "form": ["red"] * 3 + ["Red"] * 3 + ["red"] * 3,
            "prob": [0.1, 0.2, 0.7, 0.0, 0.1, 0.3, 0.5, 0.5, 0.5],
            "rank": [9, 3, 1, 20, 8, 2, 1, 1, 1],
        }
    )
    fig = plot_logit_lens(table, value="prob", batch=0)
    ax = fig.axes[0]
    assert len(fig.axes) == 1 and [line.get_label() for line in ax.get_lines()] == ["'red'", "'Red'"]
    assert ax.get_lines()[0].get_ydata().tolist() == [0.1, 0.2, 0.7]
    assert saved(fig, tmp_path / "lens.png") > 1000
    ranks = plot_logit_lens(table, value="rank", batch=0)
    assert ranks.axes[0].get_yscale() == "log"
    with pytest.raises(ValueError, match="batch 5"):
        plot_logit_lens(table, batch=5)


def test_head_scores_heatmap(tmp_path):
    scores = torch.randn(2, 3, 4)
    fig = plot_head_scores(scores, batch=1)
    assert len(fig.axes) == 2  # heatmap and colour bar
    ax = fig.axes[0]
    assert_close(torch.tensor(np.asarray(ax.images[0].get_array())), scores[1])
    assert ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    assert ax.images[0].get_clim() == (-float(scores[1].abs().max()), float(scores[1].abs().max()))
    assert saved(fig, tmp_path / "heads.png") > 1000


def test_processed_image_undoes_the_processor_normalisation(setup):
    model, inputs, images = setup
    processor = model.processor.image_processor
    assert tuple(processor.image_mean) == pytest.approx(CLIP_MEAN) and tuple(processor.image_std) == pytest.approx(
        CLIP_STD
    )
    for row in range(2):  # 32 px images: resize and crop leave them unchanged
        assert np.abs(processed_image(inputs, row) - np.asarray(images[row]) / 255.0).max() < 1e-5
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 40, 3), dtype=np.uint8))
    assert processed_image(wide).shape == (20, 20, 3)
    assert processed_image(wide, size=32).shape == (32, 32, 3)


def test_patch_heatmap_overlays_the_upsampled_map(setup, tmp_path):
    _, inputs, _ = setup
    heat = torch.zeros(2, 4, 4)
    heat[1, 0, 3] = 1.0
    fig = plot_patch_heatmap(inputs, heat, row=1, title="patches")
    assert len(fig.axes) == 2  # the image axes and the colour bar
    ax = fig.axes[0]
    picture, overlay = (np.asarray(im.get_array()) for im in ax.images)
    assert picture.shape == (32, 32, 3) and overlay.shape == (32, 32)
    assert np.abs(picture - processed_image(inputs, 1)).max() == 0
    hot = np.unravel_index(overlay.argmax(), overlay.shape)
    assert hot[0] < 8 and 24 <= hot[1]  # inside patch (row 0, col 3) of the 8 px grid
    assert overlay.min() >= 0 and overlay.max() <= 1  # clamped to the map's range
    assert saved(fig, tmp_path / "heat.png") > 1000
    flat = plot_patch_heatmap(inputs, torch.full((4, 4), 0.25), row=0)
    assert np.allclose(np.asarray(flat.axes[0].images[1].get_array()), 0.25)


def test_patch_heatmap_on_a_pil_image(setup, tmp_path):
    _, _, images = setup
    fig = plot_patch_heatmap(images[0], torch.rand(4, 4), size=64)
    assert np.asarray(fig.axes[0].images[0].get_array()).shape == (64, 64, 3)
    assert saved(fig, tmp_path / "pil.png") > 1000
