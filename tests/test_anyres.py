"""Patch importance, heatmaps and knockout flows on LLaVA-NeXT (anyres) inputs."""

from __future__ import annotations

import pytest
import torch
from test_architectures import PROMPTS, SIZES, _image, _next

from analyses.attribution.scores import log_prob_increase
from analyses.information_flow.attention_knockout import knockout, knockout_sweep
from analyses.patch_maps.anyres import anyres_maps, token_importance
from analyses.plotting.figures import plot_anyres_maps


@pytest.fixture(scope="module")
def next_model():
    return _next()


@pytest.fixture(scope="module")
def next_inputs(next_model):
    model, _ = next_model
    images = [_image(SIZES[0]), _image(SIZES[3], 1)]
    return model.prepare(images=images, prompts=PROMPTS, boxes=[[(0, 0, 20, 15)], [(40, 5, 70, 20)]]), images


def test_attention_baseline_matches_hf_attentions_at_every_image_token(next_model, next_inputs):
    model, hf = next_model
    inputs, _ = next_inputs
    with torch.no_grad():
        out = hf(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            image_sizes=torch.tensor(inputs.image_sizes),
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids(),
            output_attentions=True,
        )
    last = inputs.last
    mean = torch.stack([a[torch.arange(2), :, last] for a in out.attentions]).mean(dim=(0, 2))  # [batch, key]
    ours = token_importance(model, inputs, method="attention")
    table = inputs.image_map()
    patches = table[table.kind != "newline"]
    rows, pos = patches.row.to_list(), patches.pos.to_list()
    torch.testing.assert_close(ours[rows, pos], mean[rows, pos], atol=1e-6, rtol=1e-5)
    newline = table[table.kind == "newline"]
    assert (ours[newline.row.to_list(), newline.pos.to_list()] == 0).all()


def test_patch_tool_on_next_is_the_top_heads_position_scores_normalised(next_model, next_inputs):
    model, _ = next_model
    inputs, _ = next_inputs
    scores = token_importance(model, inputs)
    heads = log_prob_increase(model, inputs, unit="head")
    for b in range(2):
        layer, head = divmod(int(heads[b].flatten().argmax()), model.cfg.n_heads)
        raw = log_prob_increase(model, inputs[b], unit="position", head=(layer, head))[0]
        table = inputs[b].image_map()
        pos = table[table.kind != "newline"].pos.to_list()
        v = raw[pos]
        expected = (v - v.min()) / (v.max() - v.min())
        torch.testing.assert_close(scores[b, pos], expected / expected.sum(), atol=1e-6, rtol=1e-4)
        assert abs(float(scores[b].sum()) - 1) < 1e-5


def test_anyres_maps_put_every_token_in_its_grid_cell(next_model, next_inputs):
    model, _ = next_model
    inputs, _ = next_inputs
    values = torch.arange(inputs.shape[1], dtype=torch.float).expand(2, -1)
    maps = anyres_maps(inputs, values)
    layouts = model.layouts(inputs.image_sizes)
    for b, (row_maps, layout) in enumerate(zip(maps, layouts, strict=True)):
        assert row_maps["base"].shape == (layout.grid, layout.grid)
        assert row_maps["highres"].shape == (layout.rows, layout.cols)
        table = inputs.image_map()
        cell = table[(table.row == b) & (table.kind == "highres")].iloc[5]
        assert row_maps["highres"][cell.grid_row, cell.grid_col] == cell.pos


def test_plot_draws_base_and_highres_over_the_original_image(next_inputs, tmp_path):
    inputs, images = next_inputs
    values = torch.rand(inputs.shape)
    fig = plot_anyres_maps(images[1], inputs, values, row=1)
    assert [ax.get_title() for ax in fig.axes[::2]] == ["base tokens", "highres tokens"]
    assert fig.axes[0].images[0].get_array().shape[:2] == (images[1].height, images[1].width)
    fig.savefig(tmp_path / "maps.png")
    assert (tmp_path / "maps.png").stat().st_size > 5000


def test_knockout_flows_run_on_next_inputs(next_model, next_inputs):
    model, _ = next_model
    inputs, _ = next_inputs
    flows = ["image->last", "related->question"]
    assert (inputs.mask("related").sum(1) > 0).all() and (inputs.mask("question").sum(1) > 0).all()
    sweep = knockout_sweep(model, inputs, flows, window=3, progress=False)
    row = sweep[(sweep.flow == "related->question") & (sweep.layer == 1) & (sweep.example == 1)].iloc[0]
    with torch.no_grad():
        logits = knockout(model, inputs[1], "related", "question", layers=[0, 1, 2])
    p = logits[0, inputs.last[1]].float().softmax(-1)
    answer = int(model(inputs[1])[0, inputs.last[1]].argmax())
    assert abs(float(p[answer]) - row.p_blocked) < 1e-5 and abs(row.p_blocked - row.p_base) > 1e-7
    image = inputs.mask("image")
    assert image.sum(1).tolist() == [len(t) for t in inputs.token_tables]  # base, tiles and newlines
