"""Numerical parity of HookedLlava with HF's LlavaForConditionalGeneration (eager, fp32)."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from hooked_llava import HookedLlava
from hooked_llava.testing import random_images, tiny_model

CONFIGS = {
    "gqa-layer-2-default": dict(n_kv_heads=2, feature_layer=-2, strategy="default"),
    "mha-layer-1-full": dict(n_kv_heads=None, feature_layer=-1, strategy="full"),
    "gqa-multilayer-default": dict(n_kv_heads=1, feature_layer=[-3, -1], strategy="default", vision_layers=4),
    "mha-layer-2-full-rope": dict(n_kv_heads=None, feature_layer=-2, strategy="full", rope_theta=500.0),
}


def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(
            input_ids=inputs.input_ids,
            pixel_values=inputs.pixel_values,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids(),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_hf_on_padded_batch_of_two_images(name, padding_side):
    model, hf = tiny_model(seed=3, **CONFIGS[name])
    inputs = model.prepare(images=random_images(2, seed=2), prompts=PROMPTS, padding_side=padding_side)
    assert (inputs.attention_mask == 0).any(), "the batch must be padded"
    ref = _hf_logits(hf, inputs)
    with torch.no_grad():
        ours = model(inputs)
    real = inputs.attention_mask.bool()
    diff = (ours - ref.logits)[real].abs().max().item()
    assert diff <= 1e-4, f"max |Δ logits| = {diff}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_cached_vision_residual_equals_hf_hidden_states(name):
    model, hf = tiny_model(seed=4, **CONFIGS[name])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        features = model.vision(pixels)
        _, vcache = model.run_with_cache(
            model.to_tokens("USER: <image>\nWhat").repeat(2, 1),
            pixel_values=pixels,
            names_filter=lambda n: n.startswith("vision"),
        )
    n = model.vision.cfg.n_layers_computed
    assert n == max(model.vision.cfg.feature_layers)
    torch.testing.assert_close(vcache["vision.ln_pre.hook_normalized"], ref[0], atol=1e-5, rtol=1e-5)
    for layer in range(n):
        torch.testing.assert_close(
            vcache[f"vision.blocks.{layer}.hook_resid_post"], ref[layer + 1], atol=1e-5, rtol=1e-5
        )
    with torch.no_grad():
        ref_features = hf.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(model.projector(features), torch.stack(list(ref_features)), atol=1e-5, rtol=1e-5)


def test_only_blocks_up_to_the_feature_layer_are_built():
    model, _ = tiny_model(vision_layers=4, feature_layer=-2)
    assert len(model.vision.blocks) == 3
    model, _ = tiny_model(vision_layers=4, feature_layer=1)
    assert len(model.vision.blocks) == 1


def test_hook_embed_is_the_merged_sequence(tiny, batch):
    model, hf = tiny
    _, cache = model.run_with_cache(batch)
    assert torch.equal(cache["hook_embed"], cache["blocks.0.hook_resid_pre"])
    image = batch.mask("image")
    features = cache["projector.hook_out"].reshape(-1, model.cfg.d_model)
    torch.testing.assert_close(cache["hook_embed"][image], features)
    tokens = model.W_E[batch.input_ids]
    torch.testing.assert_close(cache["hook_embed"][~image], tokens[~image])


def test_bf16_agrees_with_hf_fp32_within_stated_tolerance(batch):
    """bf16 keeps ~3 significant digits; over 3 layers logits stay within 0.1 of fp32 HF."""
    model, hf = tiny_model(seed=5)
    model16 = HookedLlava.from_hf(hf, model.processor, dtype=torch.bfloat16)
    hf16 = tiny_model(seed=5)[1].to(torch.bfloat16)
    with torch.no_grad():
        ours = model16(batch.input_ids, pixel_values=batch.pixel_values.bfloat16(), attention_mask=batch.attention_mask)
        ref16 = hf16(
            input_ids=batch.input_ids,
            pixel_values=batch.pixel_values.bfloat16(),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids(),
        ).logits
        ref32 = _hf_logits(hf, batch).logits
    real = batch.attention_mask.bool()
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref16.float())[real].abs().max().item() <= 0.05
    assert (ours.float() - ref32)[real].abs().max().item() <= 0.1


def test_eager_and_fused_attention_paths_agree(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        fused = model(batch)
        eager = model.run_with_hooks(batch, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: x)])
        with model.hook_switches(use_attn_result=True):
            per_head = model.run_with_hooks(batch, fwd_hooks=[(lambda n: n.endswith("hook_result"), lambda x, hook: x)])
    real = batch.attention_mask.bool()
    torch.testing.assert_close(fused[real], eager[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[real], per_head[real], atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_a_prompts_logits(tiny, images):
    model, _ = tiny
    with torch.no_grad():
        batch = model(model.prepare(images=images, prompts=PROMPTS, padding_side="left"))
        alone = model(model.prepare(images=images[1:], prompts=PROMPTS[1:]))
    torch.testing.assert_close(batch[1, -alone.shape[1] :], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block", [1, 7, 1 << 20])
def test_blockwise_pattern_softmax_equals_hf_eager_softmax_exactly(dtype, block, monkeypatch):
    """The pattern is HF eager's `softmax(scores, dtype=fp32).to(dtype)`, bit for bit, however the rows are blocked."""
    from hooked_llava.model import attention

    monkeypatch.setattr(attention, "SOFTMAX_BLOCK", block)
    scores = (torch.randn(2, 3, 5, 11) * 4).to(dtype)
    scores[..., 6:] = torch.finfo(dtype).min  # masked keys, as the additive mask leaves them
    strided = scores.transpose(1, 2)  # a hook may hand on a non-contiguous tensor
    for x in (scores, strided):
        expected = torch.nn.functional.softmax(x, dim=-1, dtype=torch.float32).to(dtype)
        got = attention.softmax_fp32(x)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, expected)
