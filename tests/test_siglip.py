"""SigLIP towers (LLaVA-Interleave): parity with HF, every vision hook live, feature-layer selection."""

from __future__ import annotations

import pytest
import torch

from hooked_llava.testing import random_images
from hooked_llava.testing_onevision import tiny_pair

ATOL = 1e-4
VISION_BLOCK = [
    "hook_resid_pre", "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input", "ln1.hook_scale",
    "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "attn.hook_result", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "ln2.hook_scale",
    "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]  # fmt: skip


@pytest.fixture(scope="module")
def interleave():
    torch.manual_seed(0)
    return tiny_pair("interleave")


def _prompt(n_images: int, question: str) -> str:
    return "<|im_start|>user\n" + "<image>\n" * n_images + question + "<|im_end|>\n<|im_start|>assistant\n"


def _hf_logits(hf, out):
    with torch.no_grad():
        return hf(**{k: v for k, v in out.items() if k != "offset_mapping"}).logits


def test_interleave_parity_several_images_left_padded(interleave):
    model, hf = interleave
    texts = [_prompt(2, "Which image is red?"), _prompt(1, "What is in the picture?")]
    out = model.processor(
        images=random_images(3, 40), text=texts, return_tensors="pt", padding=True, padding_side="left"
    )
    inputs = model.prepare(
        input_ids=out["input_ids"], pixel_values=out["pixel_values"], attention_mask=out["attention_mask"]
    )
    real = out["attention_mask"].bool()
    diff = (model(inputs) - _hf_logits(hf, out))[real].abs().max().item()
    assert diff <= ATOL, diff
    assert model.vision.cfg.tower == "siglip" and not model.vision.cfg.has_cls
    assert int(inputs.image_mask.sum()) == 3 * 16  # 4×4 patches each, no CLS


def test_prepare_uses_chatml_for_several_images(interleave):
    model, _ = interleave
    inputs = model.prepare(questions=["What is the color of the circle?"], images=[random_images(2, 40)])
    text = inputs.texts[0]
    assert text.startswith("<|im_start|>user\n<image>\n<image>\n") and text.endswith("<|im_start|>assistant\n")
    assert model.to_string(inputs.input_ids[0, inputs.positions("question")[0]]) == "What is the color of the circle?"


@pytest.mark.parametrize("layer,strategy", [(-2, "full"), ([-2, -1], "full"), (-1, "default"), ([0, -1], "default")])
def test_feature_layers_and_strategies_match_hf(layer, strategy):
    model, hf = tiny_pair("interleave", feature_layer=layer, strategy=strategy)
    assert model.vision.cfg.n_layers_computed == max(model.vision.cfg.feature_layers)
    out = model.processor(images=random_images(1, 40, seed=4), text=[_prompt(1, "What?")], return_tensors="pt")
    inputs = model.prepare(input_ids=out["input_ids"], pixel_values=out["pixel_values"])
    diff = (model(inputs) - _hf_logits(hf, out)).abs().max().item()
    assert diff <= ATOL, diff


def test_every_siglip_vision_hook_is_live(interleave):
    model, _ = interleave
    inputs = model.prepare(questions=["What is the color?"], images=[random_images(1, 40)])
    n = model.vision.cfg.n_layers_computed
    names = ["vision.hook_patch_embed", "vision.hook_pos_embed", "vision.hook_embed"]
    names += [f"vision.blocks.{b}.{h}" for b in range(n) for h in VISION_BLOCK]
    assert set(names) <= set(model.hook_dict)
    assert not any("ln_pre" in k or "post_layernorm" in k for k in model.hook_dict)
    perturb = lambda x, hook: x + 0.5 * x.roll(1, dims=-1)  # noqa: E731  (not undone by a LayerNorm)
    with model.hook_switches(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True):
        clean = model(inputs)
        for name in [n for n in names if not n.endswith("hook_attn_in")]:
            changed = (model.run_with_hooks(inputs, fwd_hooks=[(name, perturb)]) - clean).abs().max().item()
            assert changed > 1e-5, name
    # hook_attn_in needs multi-head attention: the SigLIP tower has it (the GQA language model does not).
    model.vision.cfg.use_attn_in = True
    try:
        clean = model(inputs)
        for name in [n for n in names if n.endswith("hook_attn_in")]:
            changed = (model.run_with_hooks(inputs, fwd_hooks=[(name, perturb)]) - clean).abs().max().item()
            assert changed > 1e-5, name
    finally:
        model.vision.cfg.use_attn_in = False


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_interleave_image_map_boxes_match_the_processor(strategy):
    import numpy as np
    from PIL import Image

    model, _ = tiny_pair("interleave", strategy=strategy)
    y, x = np.mgrid[0:40, 0:120]
    image = Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))  # red = x, green = y
    inputs = model.prepare(questions=["What is the color?"], images=[image])
    table = inputs.image_map()
    assert len(table) == 16 - (strategy == "default") and (table.kind == "base").all()
    patch = model.vision.cfg.patch_size
    for t in table.itertuples():
        cell = inputs.pixel_values[0, :2, t.grid_row * patch : (t.grid_row + 1) * patch,
                                   t.grid_col * patch : (t.grid_col + 1) * patch] * 0.5 + 0.5  # fmt: skip
        cx, cy = ((cell * 255).round().flatten(1).mean(1) + 0.5).tolist()
        assert abs(cx - (t.x0 + t.x1) / 2) <= 2 and abs(cy - (t.y0 + t.y1) / 2) <= 2, (t, cx, cy)
    assert (table.grid_row * 4 + table.grid_col).tolist()[0] == int(strategy == "default")
