"""The explorers on tiled inputs (LLaVA-OneVision and LLaVA-NeXT): the base view of the row's first
image drawn with its tokens on the base grid, the tile and newline tokens left out and said so,
checked in headless Chromium against the model's own hooks and an independent logit lens.
"""

from __future__ import annotations

import pytest
import torch
from test_viz import assert_clean, assert_shown, choose, click, open_page, values

from hooked_llava.testing import random_images


@pytest.fixture(scope="module")
def onevision():
    from hooked_llava.testing_onevision import tiny_pair

    model, _ = tiny_pair()
    image = random_images(1, 48)[0].resize((64, 40))  # wide: a base view and 2 tiles
    inputs = model.prepare(questions=["What is the color of the circle?"], images=[[image]])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    return model, inputs, cache


def base_cells(inputs) -> dict[str, int]:
    """`patch-{r}-{c}` → sequence position of the first image's base-view tokens of row 0 (from `image_map`)."""
    table = inputs.image_map()
    base = table[(table["row"] == 0) & (table["kind"] == "base") & (table["image"] == table["image"].min())]
    return {f"patch-{r}-{c}": p for p, r, c in zip(base["pos"], base["grid_row"], base["grid_col"], strict=True)}


def test_onevision_attention_shows_the_base_view_and_says_what_it_leaves_out(onevision, driver, tmp_path):
    from analyses.viz import attention_explorer

    model, inputs, cache = onevision
    table = inputs.image_map()
    assert set(table["kind"]) == {"base", "highres", "newline"}  # the case this test is about
    view = attention_explorer(model, inputs)
    hidden = int((table["kind"] != "base").sum())
    assert f"{hidden} tile and newline tokens left out" in view.title
    assert set(view.payload["positions"]).isdisjoint(table.loc[table["kind"] != "base", "pos"].tolist())
    open_page(driver, view.save(tmp_path / "attention.html"))
    cells, last = base_cells(inputs), int(inputs.last[0])
    assert len(cells) == view.payload["grid"] ** 2
    layer = model.cfg.n_layers - 1
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0]  # [head, query, key]
    choose(driver, "layer-select", str(layer))
    choose(driver, "head-select", "1")
    click(driver, f"token-{last}")
    shown = values(driver)
    assert_shown(shown, {cell: float(pattern[1, last, p]) for cell, p in cells.items()})
    text = [p for p in range(inputs.input_ids.shape[1]) if not inputs.image_mask[0, p]]
    assert_shown(shown, {f"token-{p}": float(pattern[1, last, p]) for p in text})
    assert not any(f"token-{p}" in shown for p in table["pos"])  # no image token in the text strip
    assert_clean(driver)


def test_onevision_vision_tower_view_is_the_base_views_siglip_attention(onevision, driver, tmp_path):
    from analyses.viz import attention_explorer

    model, inputs, cache = onevision
    view = attention_explorer(model, inputs, tower="vision", layers=[0])
    open_page(driver, view.save(tmp_path / "vision.html"))
    base_tile = int(inputs.image_map().query("kind == 'base'")["tile"].iloc[0])
    pattern = cache["vision.blocks.0.attn.hook_pattern"][base_tile]  # SigLIP: no CLS, patches row-major
    grid = model.vision.cfg.image_size // model.vision.cfg.patch_size
    cells = {f"patch-{r}-{c}": r * grid + c for r in range(grid) for c in range(grid)}
    choose(driver, "head-select", "0")
    choose(driver, "patch-mode", "query")
    click(driver, "patch-1-2")
    assert_shown(values(driver), {c: float(pattern[0, cells["patch-1-2"], p]) for c, p in cells.items()})
    assert_clean(driver)


def test_onevision_patch_lens_reads_the_base_views_tokens(onevision, driver, tmp_path):
    from analyses import logit_lens
    from analyses.viz import patch_lens_explorer

    model, inputs, cache = onevision
    view = patch_lens_explorer(model, inputs, layers=[1, model.cfg.n_layers])
    open_page(driver, view.save(tmp_path / "lens.html"))
    cells = base_cells(inputs)
    order = list(cells)
    lens = logit_lens(model, inputs, positions=[cells[c] for c in order])  # [layer, 1, cell, vocab]
    for i, layer in enumerate((1, model.cfg.n_layers)):
        choose(driver, "layer-select", str(i))
        shown = values(driver, "data-top-token")
        ids = lens[layer, 0].argmax(-1).tolist()
        assert {c: shown[c] for c in order} == dict(zip(order, model.tokenizer.batch_decode([[i] for i in ids])))
        n = model.cfg.n_layers
        resid = cache[f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"]
        by_hand = (model.ln_final(resid) @ model.W_U + model.b_U)[0].argmax(-1)
        assert [by_hand[cells[c]].item() for c in order] == ids
    assert_clean(driver)


def test_the_picture_is_unnormalised_with_the_checkpoints_own_mean_and_std(onevision):
    from analyses.viz.grid import image_grid

    model, inputs, _ = onevision
    mean = torch.tensor(model.processor.image_processor.image_mean)[:, None, None]
    std = torch.tensor(model.processor.image_processor.image_std)[:, None, None]
    assert not torch.allclose(mean, torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None])  # not CLIP's
    by_hand = (inputs.pixel_values[0, 0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    drawn = image_grid(model, inputs, 0)
    assert abs(drawn.image - by_hand).max() < 1e-6


def test_next_attention_view_on_its_base_grid(driver, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    from analyses.viz import attention_explorer
    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_next_config, tiny_next_processor

    config = tiny_next_config()
    torch.manual_seed(0)

    model = HookedLlava.from_hf(LlavaNextForConditionalGeneration(config).eval(), tiny_next_processor())
    inputs = model.prepare(images=[random_images(1, 40)[0].resize((64, 32))], questions=["Is the square red?"])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    view = attention_explorer(model, inputs, layers=[0])
    open_page(driver, view.save(tmp_path / "next.html"))
    cells, last = base_cells(inputs), int(inputs.last[0])
    pattern = cache["blocks.0.attn.hook_pattern"][0]
    choose(driver, "head-select", "mean")
    click(driver, f"token-{last}")
    assert_shown(values(driver), {cell: float(pattern[:, last, p].mean()) for cell, p in cells.items()})
    assert_clean(driver)


def test_explain_embeds_working_explorers_for_a_tiled_model(onevision):
    from analyses.report.explain import explain

    model, inputs, _ = onevision
    report = explain(model, inputs, say=lambda _: None)
    assert set(report.explorers) == {"patches", "embedding"}
    assert report.explorers["patches"].payload["grid"] == report.explorers["embedding"].payload["grid"]
    assert "explorers below show the base view" in report.notes["embedding"]
