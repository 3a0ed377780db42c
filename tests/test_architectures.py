"""LLaVA-NeXT (anyres), Mistral and Qwen2 language models, and text-only models: parity,
loading, hook names and liveness, and the NeXT position map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_llava import HookedLlava
from hooked_llava.testing import random_images, tiny_llava_config, tiny_next_config, tiny_next_processor, tiny_processor

PROMPTS = ["USER: <image>\nWhat is the color of the circle?\nASSISTANT:", "USER: <image>\nIs it red?\nASSISTANT:"]
# (height, width): a wide image letterboxed into a 1×2 grid, a tall one into 3×1, a square 2×2, and a 1×3 strip
SIZES = [(30, 60), (90, 30), (64, 64), (20, 90)]


def _image(size, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def _hf(config, seed=0):
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()


def _next(text="llama", seed=0):
    hf = _hf(tiny_next_config(text), seed)
    return HookedLlava.from_hf(hf, tiny_next_processor()), hf


def _llava(text, seed=0):
    from hooked_llava.testing import _text_config

    cfg = tiny_llava_config()
    cfg.text_config = _text_config(text, cfg.text_config)
    hf = _hf(cfg, seed)
    return HookedLlava.from_hf(hf, tiny_processor()), hf


def _max_diff(model, hf, inputs):
    kwargs = (
        {}
        if inputs.image_sizes is None or model.cfgs.pinpoints is None
        else {"image_sizes": torch.tensor(inputs.image_sizes)}
    )
    with torch.no_grad():
        ref = hf(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids(),
            **kwargs,
        ).logits
        ours = model(inputs)
    return (ref - ours)[inputs.attention_mask.bool()].abs().max().item()


def test_next_tile_grids_differ_across_the_test_sizes():
    model, _ = _next()
    grids = {lay.tiles for lay in model.layouts(SIZES)}
    assert grids == {(1, 2), (3, 1), (2, 2), (1, 3)}
    unpadded = [lay for lay in model.layouts(SIZES) if lay.offset != (0, 0)]
    assert unpadded, "at least one size must be unpadded"


@pytest.mark.parametrize("text", ["llama", "mistral"])
@pytest.mark.parametrize("sizes", [SIZES[:2], SIZES[2:]])
def test_next_logits_match_hf(text, sizes):
    model, hf = _next(text)
    inputs = model.prepare(images=[_image(s, i) for i, s in enumerate(sizes)], prompts=PROMPTS)
    assert _max_diff(model, hf, inputs) <= 1e-4


@pytest.mark.parametrize("text", ["mistral", "qwen2"])
def test_llava_with_other_language_models_matches_hf(text):
    model, hf = _llava(text)
    assert model.cfg.model_name == text
    inputs = model.prepare(images=random_images(2, seed=5), prompts=PROMPTS)
    assert _max_diff(model, hf, inputs) <= 1e-4
    if text == "qwen2":
        assert model.cfg.attention_bias and not model.cfg.output_bias and model.blocks[0].attn.b_q is not None


@pytest.mark.parametrize("text", ["llama", "mistral", "qwen2"])
def test_text_only_models_match_hf_and_load_from_shards(text, tmp_path):
    from transformers import AutoModelForCausalLM

    from hooked_llava.testing import _text_config

    config = _text_config(text, tiny_llava_config().text_config)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    model = HookedLlava.from_pretrained(tmp_path)
    ids = torch.randint(5, config.vocab_size, (2, 30))  # longer than the 24-token sliding window
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        out = model(ids, attention_mask=mask)
    assert (ref - out)[mask.bool()].abs().max() <= 1e-4
    from test_hooks import GOLDEN_BLOCK, LIVE_SWITCHES, _perturb, live_names

    golden = ["hook_embed", *(f"blocks.{l}.{n}" for l in range(3) for n in GOLDEN_BLOCK)]
    assert model.vision is None and model.hook_names == golden + ["ln_final.hook_scale", "ln_final.hook_normalized"]
    with torch.no_grad(), model.hook_switches(**LIVE_SWITCHES):
        clean = model(ids, attention_mask=mask)
        for name in live_names(model):  # every hook is live
            out = model.run_with_hooks(ids, attention_mask=mask, fwd_hooks=[(name, _perturb)])
            assert (out - clean)[mask.bool()].abs().max() > 1e-4, name


@pytest.mark.parametrize("build", ["next-llama", "llava-mistral", "llava-qwen2", "next-mistral"])
def test_sharded_checkpoints_of_new_architectures_load(build, tmp_path):
    kind, text = build.split("-")
    model, hf = _next(text) if kind == "next" else _llava(text)
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = HookedLlava.from_pretrained(tmp_path, processor=model.processor)
    inputs = model.prepare(images=[_image(SIZES[0]), _image(SIZES[1], 1)], prompts=PROMPTS)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), model(inputs))


def _golden(model):
    from test_hooks import golden_names

    names = golden_names(len(model.vision.blocks), model.cfg.n_layers)
    if model.cfgs.pinpoints is not None:
        names.insert(names.index("hook_embed"), "hook_image_newline")
        names.insert(names.index("hook_embed"), "hook_image_features")
    return names


@pytest.mark.parametrize("build", ["next-llama", "llava-mistral", "llava-qwen2", "next-mistral"])
def test_golden_hook_names_and_liveness(build):
    kind, text = build.split("-")
    model, _ = _next(text) if kind == "next" else _llava(text)
    from test_hooks import LIVE_SWITCHES, default_names, live_names

    assert model.hook_names == _golden(model)
    inputs = model.prepare(images=[_image(SIZES[0]), _image(SIZES[1], 1)], prompts=PROMPTS)
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs)
    assert set(cache.keys()) == set(default_names(model))
    with torch.no_grad(), model.hook_switches(**LIVE_SWITCHES):
        clean, cache = model.run_with_cache(inputs)
    assert set(cache.keys()) == set(live_names(model))
    dead = []
    for name in live_names(model):
        perturb = lambda x, hook: x * 1.5 + 0.1 * torch.randn_like(x)
        if name.endswith("hook_pattern"):
            perturb = lambda x, hook: torch.softmax(torch.randn_like(x), -1) * (x > 0)
        with torch.no_grad(), model.hook_switches(**LIVE_SWITCHES):
            out = model.run_with_hooks(inputs, fwd_hooks=[(name, perturb)])
        if (out - clean)[inputs.attention_mask.bool()].abs().max() < 1e-4:
            dead.append(name)
    assert dead == []


def test_newlines_are_recorded_where_hf_inserts_them():
    model, hf = _next()
    inputs = model.prepare(images=[_image(SIZES[0]), _image(SIZES[3], 1)], prompts=PROMPTS)
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(inputs.input_ids)
        features = hf.model.get_image_features(
            pixel_values=inputs.pixel_values, image_sizes=torch.tensor(inputs.image_sizes)
        ).pooler_output
        merged = embeds.masked_scatter(inputs.mask("image")[..., None], torch.cat(features))
    is_newline = (merged == hf.model.image_newline).all(-1)
    table = inputs.image_map()
    recorded = torch.zeros_like(is_newline)
    rows = table[table.kind == "newline"]
    recorded[torch.tensor(rows.row.to_list()), torch.tensor(rows.pos.to_list())] = True
    assert is_newline.sum() > 0 and torch.equal(recorded, is_newline)


@pytest.mark.parametrize("size", SIZES)
def test_position_map_points_every_token_at_its_source_pixels(size):
    """Paint each token's recorded pixel box: that token's patch embedding changes, and no token
    whose box lies apart from the painted pixels changes."""
    model, _ = _next()
    image = _image(size)
    inputs = model.prepare(images=[image], prompts=PROMPTS[:1])
    table = inputs.image_map()
    tokens = table[table.kind != "newline"].reset_index(drop=True)

    def patch_embeds(img):
        batch = model.prepare(images=[img], prompts=PROMPTS[:1])
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names_filter="vision.hook_patch_embed")
        g = model.vision.cfg.grid_size
        emb = cache["vision.hook_patch_embed"]
        return torch.stack([emb[t.tile, t.tile_row * g + t.tile_col] for t in tokens.itertuples()])

    clean = patch_embeds(image)
    rng = np.random.default_rng(1)
    for k in rng.choice(len(tokens), size=8, replace=False):
        x0, y0, x1, y1 = tokens.loc[k, ["x0", "y0", "x1", "y1"]]
        px0, py0, px1, py1 = int(np.floor(x0)), int(np.floor(y0)), int(np.ceil(x1)), int(np.ceil(y1))
        painted = np.array(image).copy()
        painted[py0:py1, px0:px1] = 255 - painted[py0:py1, px0:px1]
        changed = (patch_embeds(Image.fromarray(painted)) - clean).abs().amax(-1) > 1e-6
        apart = (tokens.x1 <= px0) | (tokens.x0 >= px1) | (tokens.y1 <= py0) | (tokens.y0 >= py1)
        assert changed[k], f"token {k} did not change when its box was painted"
        assert not changed[torch.tensor(apart.to_numpy())].any(), f"painting token {k} changed tokens apart from it"


def test_related_patches_on_next_follow_the_anyres_mapping():
    model, _ = _next()
    box = (0, 0, 10, 10)  # top-left corner of a 30×60 image
    inputs = model.prepare(images=[_image(SIZES[0])], prompts=PROMPTS[:1], boxes=[[box]])
    table = inputs.image_map()
    related = table[inputs.mask("related")[table.row, table.pos].numpy()]
    assert set(related.kind) == {"base", "highres"}
    assert (related.x0 < 10).all() and (related.y0 < 10).all()
    outside = table[(table.kind != "newline") & ((table.x0 >= 10) | (table.y0 >= 10))]
    assert not inputs.mask("related")[outside.row.to_list(), outside.pos.to_list()].any()
    assert inputs.mask("other_image").sum() == inputs.mask("image").sum() - len(related)


def test_question_roles_on_next_inputs_of_different_sizes():
    model, _ = _next()
    inputs = model.prepare(images=[_image(SIZES[0]), _image(SIZES[3], 1)], prompts=PROMPTS)
    words = [model.to_str_tokens(inputs.input_ids[b][inputs.mask("question")[b]]) for b in range(2)]
    assert words == [["What", "is", "the", "color", "of", "the", "circle", "?"], ["Is", "<unk>", "red", "?"]]
