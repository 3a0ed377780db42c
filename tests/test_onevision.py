"""LLaVA-OneVision: parity with HF (anyres_max packing, downsampling, several images, text rows,
video), the merged embeddings, and the position map against the processor's geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hooked_llava.model import next as next_
from hooked_llava.testing import random_images
from hooked_llava.testing_onevision import tiny_pair

ATOL = 1e-4


@pytest.fixture(scope="module")
def onevision():
    return tiny_pair("onevision")


@pytest.fixture(scope="module")
def downsampling():
    return tiny_pair("onevision", seed=1, max_num_patches=1)  # a 2×2 tile grid (8×8 cells) exceeds 1 base view


def _image(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def _gradient(height: int, width: int) -> Image.Image:
    """Red = x, green = y (both < 256), so a patch's pixels say where in the image they came from."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


def _hf(hf, inputs, embeds: bool = False):
    kw = dict(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)
    if inputs.pixel_values is not None:
        kw.update(pixel_values=inputs.pixel_values, image_sizes=torch.tensor(inputs.image_sizes))
        kw.update(batch_num_images=torch.tensor(inputs.batch_num_images))
    if inputs.pixel_values_videos is not None:
        kw.update(pixel_values_videos=inputs.pixel_values_videos)
    seen = {}
    hook = hf.model.language_model.register_forward_pre_hook(
        lambda m, a, k: seen.update(x=k["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            logits = hf(**kw).logits
    finally:
        hook.remove()
    return (logits, seen["x"]) if embeds else logits


def _close(model, hf, inputs):
    real = inputs.attention_mask.bool()
    logits, cache = model.run_with_cache(inputs, names_filter="hook_embed")
    ref, embeds = _hf(hf, inputs, embeds=True)
    diff = (logits - ref)[real].abs().max().item()
    assert diff <= ATOL, diff
    image = inputs.image_mask
    torch.testing.assert_close(cache["hook_embed"][image], embeds[image], atol=1e-6, rtol=0)
    return diff


def test_wide_tall_text_row_and_two_images_in_one_left_padded_batch(onevision):
    model, hf = onevision
    images = [[_image(30, 70)], [_image(80, 20, 1)], [], [_image(50, 50, 2), _image(20, 40, 3)]]
    questions = ["What is the color?", "Which shape is it?", "Is the star red?", "Which image is on the left?"]
    inputs = model.prepare(questions=questions, images=images)
    assert inputs.batch_num_images == [1, 1, 2] and inputs.attention_mask[:, 0].tolist().count(0) >= 1
    _close(model, hf, inputs)
    table = inputs.image_map()
    kinds = table.groupby("image")["kind"].apply(lambda k: sorted(set(k))).tolist()
    assert kinds[:2] == [["base", "highres", "newline"]] * 2 and kinds[2:] == [["base", "newline"]] * 2
    assert (table.groupby("image").size().tolist()[2:]) == [16 + 1, 16 + 1]  # multi-image: base view + one newline
    assert int(inputs.mask("image")[2].sum()) == 0


def test_video_beside_an_image_row(onevision):
    model, hf = onevision
    frames = random_images(3, 36, seed=5)
    inputs = model.prepare(
        questions=["Describe the video", "What is the color?"], images=[[], [_image(40, 60)]], videos=[frames, None]
    )
    assert tuple(inputs.pixel_values_videos.shape) == (1, 3, 3, 32, 32)
    question = [model.to_string(inputs.input_ids[r, inputs.positions("question")[r]]) for r in range(2)]
    assert question == ["Describe the video", "What is the color?"]
    assert int(inputs.placeholder_mask("video").sum()) == 3 * 2 * 2 + 1  # 4×4 grid pooled to 2×2 per frame
    _close(model, hf, inputs)
    video = inputs.image_map().query("row == 0")
    assert video["kind"].tolist() == ["frame"] * 12 + ["newline"] and video["tile"].tolist()[:12:4] == [0, 1, 2]


def test_video_hooks_fire_per_frame(onevision):
    model, _ = onevision
    inputs = model.prepare(questions=["Describe the video"], videos=[random_images(2, 36)])
    _, cache = model.run_with_cache(inputs, names_filter=lambda n: n in ("vision.hook_embed", "hook_video_features"))
    assert cache["vision.hook_embed"].shape[0] == 2 and cache["hook_video_features"].shape[0] == 2 * 4 + 1


def test_downsampling_parity_and_token_count(downsampling):
    model, hf = downsampling
    inputs = model.prepare(questions=["What is the color?"], images=[[_image(64, 64)]])
    (packing,) = model.layouts(inputs.image_sizes, inputs.batch_num_images)
    assert packing.downsampled and (packing.layout.rows, packing.out_rows) == (8, 4)
    assert int(inputs.image_mask.sum()) == 16 + 4 * 5
    _close(model, hf, inputs)


def _patch_centre(pixels: torch.Tensor, tile: int, r: int, c: int, patch: int) -> tuple[float, float]:
    """Mean original (x, y) of the pixels a patch saw (red = x, green = y; mean 0.5, std 0.5)."""
    cell = pixels[tile, :2, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] * 0.5 + 0.5
    x, y = (cell * 255).round().flatten(1).mean(1).tolist()
    return x + 0.5, y + 0.5


@pytest.mark.parametrize("size,n_images", [((60, 150), 1), ((150, 60), 1), ((90, 120), 2)])
def test_image_map_boxes_match_the_processor(onevision, size, n_images):
    model, _ = onevision
    inputs = model.prepare(questions=["What is the color?"], images=[[_gradient(*size)] * n_images])
    patch, px = model.vision.cfg.patch_size, inputs.pixel_values[0]
    table = inputs.image_map().query("kind != 'newline' and image == 0")
    checked = 0
    area = (table.x1 - table.x0) * (table.y1 - table.y0)
    full = area >= 0.99 * area.groupby(table.kind).transform("max")  # cells clear of the padding
    for t, whole in zip(table.itertuples(), full, strict=True):
        if not whole:
            continue  # a cell mostly over the padding: its pixels are not the image's
        x, y = _patch_centre(px, t.tile, t.tile_row, t.tile_col, patch)
        tol = 2 * (t.x1 - t.x0) / patch + 1
        assert abs(x - (t.x0 + t.x1) / 2) <= tol and abs(y - (t.y0 + t.y1) / 2) <= tol, (t, x, y)
        checked += 1
    assert checked >= (32 if n_images == 1 else 8)


def test_image_map_boxes_after_downsampling_sit_at_the_bilinear_samples(downsampling):
    model, _ = downsampling
    inputs = model.prepare(questions=["What is the color?"], images=[[_gradient(64, 64)]])
    (packing,) = model.layouts(inputs.image_sizes, inputs.batch_num_images)
    full = [t for t in next_.token_table(packing.layout, model.vision.cfg.patch_size) if t[0] == "highres"]
    rows, cols = packing.layout.rows, packing.layout.cols
    centres = torch.tensor([[(b[0] + b[2]) / 2, (b[1] + b[3]) / 2] for *_, b in full]).view(rows, cols, 2)
    sampled = F.interpolate(centres.permute(2, 0, 1)[None], [packing.out_rows, packing.out_cols], mode="bilinear")[0]
    table = inputs.image_map().query("kind == 'highres'")
    assert len(table) == packing.out_rows * packing.out_cols
    for t in table.itertuples():
        want = sampled[:, t.grid_row, t.grid_col].tolist()
        assert abs((t.x0 + t.x1) / 2 - want[0]) < 1e-4 and abs((t.y0 + t.y1) / 2 - want[1]) < 1e-4
        assert t.x1 - t.x0 == pytest.approx(2 * (full[0][6][2] - full[0][6][0]))  # each covers 2×2 cells
