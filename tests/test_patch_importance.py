"""Patch-importance maps and their faithfulness, against the HF model run by hand."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import SHORT_PROMPTS, assert_no_hooks, random_norm_twin
from torch.testing import assert_close

from analyses.attribution.scores import log_prob_increase
from analyses.patch_maps.grid import grid_positions
from analyses.patch_maps.maps import patch_importance
from analyses.patch_maps.occlusion import faithfulness


@pytest.fixture(scope="module")
def setup():
    """Tiny model with random RMSNorm weights, its HF twin, and a left-padded batch of two images."""
    return random_norm_twin(seed=9)


def image_positions(model, inputs, b):
    return (inputs.input_ids[b] == model.cfg.image_token_id).nonzero()[:, 0]


def hf_embeds(hf, inputs, b):
    """Row b's merged embeddings built by hand from HF's embedding table and image features."""
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(inputs.input_ids[b : b + 1]).clone()
        feats = hf.model.get_image_features(
            pixel_values=inputs.pixel_values[b : b + 1],
            vision_feature_layer=hf.config.vision_feature_layer,
            vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        ).pooler_output[0]
    embeds[0, inputs.input_ids[b] == hf.config.image_token_id] = feats
    return embeds, feats


def hf_last_log_probs(hf, inputs, b, embeds):
    with torch.no_grad():
        logits = hf(inputs_embeds=embeds, attention_mask=inputs.attention_mask[b : b + 1]).logits
    return logits[0, -1].log_softmax(-1)


def normalise(x):
    x = (x - x.min()) / (x.max() - x.min())
    return x / x.sum()


def test_log_prob_increase_map_is_study_a_tool(setup):
    model, _, inputs = setup
    heat = patch_importance(model, inputs, "log_prob_increase")
    g = inputs.grid_size
    assert heat.shape == (2, g, g)
    assert (heat >= 0).all()
    assert_close(heat.sum((1, 2)), torch.ones(2), rtol=0, atol=1e-6)
    assert (heat.flatten(1).min(1).values == 0).all()
    heads = log_prob_increase(model, inputs, unit="head")
    two = patch_importance(model, inputs, "log_prob_increase", n_top_heads=2)
    for b in range(2):
        top = [divmod(int(i), model.cfg.n_heads) for i in heads[b].flatten().topk(2).indices]
        scores = [
            log_prob_increase(model, inputs, unit="position", head=h)[b, image_positions(model, inputs, b)] for h in top
        ]
        # fp32 noise of two readout batchings (~1e-7 on scores of ~1e-3), stretched by min-max
        assert_close(heat[b], normalise(scores[0]).view(g, g), rtol=1e-3, atol=2e-5)
        assert_close(two[b], normalise(scores[0] + scores[1]).view(g, g), rtol=1e-3, atol=2e-5)
    # Explicit heads: their position scores add up before normalising.
    chosen = [(1, 0), (2, 3)]
    both = patch_importance(model, inputs, "log_prob_increase", heads=chosen)
    summed = sum(log_prob_increase(model, inputs, unit="position", head=h) for h in chosen)
    for b in range(2):
        assert_close(both[b], normalise(summed[b, image_positions(model, inputs, b)]).view(g, g), rtol=1e-3, atol=2e-5)


def test_attention_map_matches_hf_attentions(setup):
    model, hf, inputs = setup
    heat = patch_importance(model, inputs, "attention")
    with torch.no_grad():
        out = hf(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            output_attentions=True,
        )
    attn = torch.stack(out.attentions)  # [layer, batch, head, q, k]
    for b in range(2):
        mean = attn[:, b, :, -1, image_positions(model, inputs, b)].mean(dim=(0, 1))
        assert_close(heat[b], mean.view(inputs.grid_size, inputs.grid_size), rtol=1e-4, atol=1e-6)


def test_occlusion_matches_a_manual_hf_forward(setup, capsys):
    model, hf, inputs = setup
    heat = patch_importance(model, inputs, "occlusion", batch_size=5, progress=True)  # 32 jobs: uneven chunks
    assert "occlusion" in capsys.readouterr().err  # the tqdm bar
    zeros = patch_importance(model, inputs, "occlusion", baseline="zeros", progress=False)
    g = inputs.grid_size
    for b in range(2):
        embeds, feats = hf_embeds(hf, inputs, b)
        clean = hf_last_log_probs(hf, inputs, b, embeds)
        y = int(clean.argmax())
        for r, c in [(0, 0), (1, 2), (3, 3)]:
            for baseline, result in [(feats.mean(0), heat), (torch.zeros_like(feats[0]), zeros)]:
                occluded = embeds.clone()
                occluded[0, image_positions(model, inputs, b)[r * g + c]] = baseline
                expected = clean[y] - hf_last_log_probs(hf, inputs, b, occluded)[y]
                assert abs(float(result[b, r, c]) - float(expected)) < 2e-5, (b, r, c)
    assert heat.abs().max() > 1e-4


def test_faithfulness_table(setup):
    model, hf, inputs = setup
    maps = {
        "lpi": patch_importance(model, inputs),
        "occlusion": patch_importance(model, inputs, "occlusion", progress=False),
    }
    n_cells = inputs.grid_size**2
    table = faithfulness(model, inputs, maps, k=[1, n_cells], progress=False, batch_size=4)
    assert list(table.columns) == ["method", "k", "batch", "p_clean", "p_occluded", "prob_drop", "relative_change"]
    assert len(table) == 3 * 2 * 2 and set(table.method) == {"lpi", "occlusion", "random"}
    for b in range(2):
        embeds, feats = hf_embeds(hf, inputs, b)
        clean = hf_last_log_probs(hf, inputs, b, embeds)
        y = int(clean.argmax())
        rows = table[table.batch == b]
        assert_close(torch.tensor(rows.p_clean.to_numpy()).float(), clean[y].exp().expand(6), rtol=1e-5, atol=1e-6)
        # Occluding the occlusion map's top patch drops log P by exactly that patch's score.
        top1 = rows[(rows.method == "occlusion") & (rows.k == 1)].iloc[0]
        assert abs(top1.p_occluded - float(clean[y].exp() * torch.exp(-maps["occlusion"][b].max()))) < 1e-6
        # Occluding every patch is the same intervention whatever the ranking.
        everything = embeds.clone()
        everything[0, image_positions(model, inputs, b)] = feats.mean(0)
        expected = hf_last_log_probs(hf, inputs, b, everything)[y].exp()
        all_rows = rows[rows.k == n_cells]
        assert_close(torch.tensor(all_rows.p_occluded.to_numpy()).float(), expected.expand(3), rtol=1e-4, atol=1e-6)
    assert_close(torch.tensor(table.prob_drop.to_numpy()), torch.tensor((table.p_clean - table.p_occluded).to_numpy()))
    relative = (table.p_occluded - table.p_clean) / table.p_clean * 100
    assert_close(
        torch.tensor(table.relative_change.to_numpy()), torch.tensor(relative.to_numpy()), rtol=1e-5, atol=1e-5
    )


def test_rows_without_an_image_are_refused(setup):
    model, _, inputs = setup
    from hooked_llava.testing import random_images

    mixed = model.prepare(images=random_images(1), prompts=[SHORT_PROMPTS[0], "USER: Is it red?\nASSISTANT:"])
    with pytest.raises(ValueError, match="exactly one LLaVA-1.5 image"):
        grid_positions(mixed)
    with pytest.raises((ValueError, TypeError)):  # TypeError when the runtime type checker is on
        patch_importance(model, inputs, "saliency")


@pytest.mark.parametrize("method", ["log_prob_increase", "attention"])
def test_no_hooks_left_even_when_a_hook_raises(setup, monkeypatch, method):
    model, _, inputs = setup
    patch_importance(model, inputs, method)
    assert_no_hooks(model)

    def broken(act, hook, store, select):
        raise RuntimeError("boom inside the hook")

    monkeypatch.setattr(importlib.import_module("analyses.readout"), "_keep", broken)
    with pytest.raises(RuntimeError, match="boom"):
        patch_importance(model, inputs, method)
    assert_no_hooks(model)


def test_occlusion_and_faithfulness_leave_no_hooks_when_the_forward_raises(setup):
    model, _, inputs = setup

    def boom(module, args, output):
        raise RuntimeError("boom in block 1")

    handle = model.blocks[1].hook_resid_pre.register_forward_hook(boom)  # a raw torch hook, not ours
    try:
        with pytest.raises(RuntimeError, match="boom"):
            patch_importance(model, inputs, "occlusion", progress=False)
        with pytest.raises(RuntimeError, match="boom"):
            faithfulness(model, inputs, {"a": torch.rand(2, 4, 4)}, k=2, progress=False)
    finally:
        handle.remove()
    assert_no_hooks(model)


def test_shapes_llava_maps_and_faithfulness(shapes_llava):
    from hooked_llava.shapes import ShapesWorld

    model = shapes_llava
    examples = [ShapesWorld(0).example(i, "Colour") for i in range(4)]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    maps = {
        m: patch_importance(model, inputs, m, progress=False) for m in ("log_prob_increase", "attention", "occlusion")
    }
    g = inputs.grid_size
    assert all(m.shape == (4, g, g) for m in maps.values())
    assert_close(maps["log_prob_increase"].sum((1, 2)), torch.ones(4), rtol=0, atol=1e-5)
    table = faithfulness(model, inputs, {"occlusion": maps["occlusion"]}, k=[4], progress=False)
    by_method = table.groupby("method")["prob_drop"].mean()
    # The causal reference's own top patches hurt the answer more than random ones.
    assert by_method["occlusion"] >= by_method["random"]


def test_float64_readout_and_bad_indices(setup):
    model, _, inputs = setup
    heat32 = patch_importance(model, inputs)
    heat64 = patch_importance(model, inputs, dtype=torch.float64)
    assert heat32.dtype == torch.float32 and heat64.dtype == torch.float64
    assert_close(heat64.float(), heat32, atol=1e-4, rtol=1e-3)
    occ = patch_importance(model, inputs, "occlusion", dtype=torch.float64, progress=False)
    assert occ.dtype == torch.float64
    n, h, cells = model.cfg.n_layers, model.cfg.n_heads, inputs.grid_size**2
    with pytest.raises(IndexError, match=rf"layer {n} is out of range: valid layers are 0\.\.{n - 1}"):
        patch_importance(model, inputs, heads=[(n, 0)])
    with pytest.raises(IndexError, match=rf"head {h} is out of range"):
        patch_importance(model, inputs, heads=[(0, h)])
    with pytest.raises(ValueError, match=rf"n_top_heads must be in 1\.\.{n * h}, got 0"):
        patch_importance(model, inputs, n_top_heads=0)
    with pytest.raises(ValueError, match=rf"k must be in 1\.\.{cells}, got {cells + 1}"):
        faithfulness(model, inputs, {"lpi": heat32}, k=[cells + 1], progress=False)
