"""TransformerLens' own tools on image+text caches: decompositions, patching, FactoredMatrix."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import FactoredMatrix, patching

from hooked_llava import HookedLlava
from hooked_llava.testing import tiny_model


@pytest.fixture(scope="module")
def folded(tiny):
    model, hf = tiny
    return HookedLlava.from_hf(hf, model.processor, fold_ln=True, center_unembed=True)


def test_model_satisfies_the_transformer_lens_protocol(tiny):
    """TransformerLens 4 states its model protocol; 3.x has none, so only the config is checked there."""
    model, _ = tiny
    assert model.cfg.n_layers == 3 and model.cfg.normalization_type == "RMS"
    protocol = pytest.importorskip("transformer_lens.model_protocol", reason="TransformerLens 3.x has none")
    assert isinstance(model, protocol.TransformerLensModelWithWeights)


def test_decompose_resid_sums_to_resid_post_at_image_positions(tiny, batch):
    model, _ = tiny
    _, cache = model.run_with_cache(batch)
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels[0] == "embed" and len(labels) == 1 + 2 * model.cfg.n_layers
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    image = batch.mask("image")
    assert (parts.sum(0) - final)[image].abs().max() <= 1e-5
    accumulated = cache.accumulated_resid()
    torch.testing.assert_close(accumulated[-1], final)


def test_stack_head_results_and_mlp_add_up_to_the_residual(tiny, batch):
    model, _ = tiny
    _, cache = model.run_with_cache(batch)
    heads = cache.stack_head_results(layer=-1)
    mlps = cache.decompose_resid(mode="mlp", incl_embeds=False)
    total = cache["hook_embed"] + heads.sum(0) + mlps.sum(0)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(total, final, atol=1e-5, rtol=1e-5)


def test_logit_attrs_with_folded_norms_sum_to_the_centred_logits(folded, batch):
    model = folded
    logits, cache = model.run_with_cache(batch)
    parts = cache.decompose_resid()
    scaled = cache.apply_ln_to_stack(parts, layer=-1)
    token = model.to_single_token("red")
    attrs = cache.logit_attrs(parts, tokens=torch.full((2, batch.shape[1]), token))
    torch.testing.assert_close(attrs.sum(0), logits[..., token], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(scaled.sum(0) @ model.W_U, logits, atol=1e-4, rtol=1e-4)


def test_weight_processing_preserves_log_probs(tiny, folded, batch):
    model, _ = tiny
    with torch.no_grad():
        ref = model(batch).log_softmax(-1)
        out = folded(batch).log_softmax(-1)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)
    assert folded.cfg.normalization_type == "RMSPre"
    assert torch.all(folded.blocks[0].ln1.w == 1)


def test_factored_qk_and_ov_circuits(tiny):
    model, _ = tiny
    qk, ov = model.QK, model.OV
    assert isinstance(qk, FactoredMatrix) and qk.shape == (3, 4, 64, 64)
    l, h = 1, 3
    kv = h // (model.cfg.n_heads // model.cfg.n_key_value_heads)
    torch.testing.assert_close(qk[l, h].AB, model.W_Q[l, h] @ model.W_K[l, kv].T)
    torch.testing.assert_close(ov[l, h].AB, model.W_V[l, kv] @ model.W_O[l, h])
    assert model.vision.QK.shape == (2, 4, 32, 32)
    w_q = model.blocks[0].attn.w_q.view(4, 16, 64)
    torch.testing.assert_close(model.W_Q[0, 2], w_q[2].T)


def test_transformer_lens_patching_runs_with_the_image_and_matches_a_manual_loop(tiny, images):
    model, _ = tiny
    prompt = ["USER: <image>\nWhat is the color of the circle?\nASSISTANT:"]
    clean = model.prepare(images=images[:1], prompts=prompt)
    corrupt = model.prepare(images=images[1:], prompts=prompt)
    red = model.to_single_token("red")
    metric = lambda logits: logits[0, -1, red]
    _, clean_cache = model.run_with_cache(clean)
    result = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert result.shape == (model.cfg.n_layers, clean.shape[1])
    manual = torch.zeros_like(result)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in range(clean.shape[1]):

            def hook(x, hook, pos=pos, name=name):
                x = x.clone()
                x[:, pos] = clean_cache[name][:, pos]
                return x

            with torch.no_grad():
                manual[layer, pos] = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
    torch.testing.assert_close(result, manual)
    image = clean.mask("image")[0]
    with torch.no_grad():
        corrupt_metric = metric(model(corrupt))
    # the image is part of the run: patching an image position at layer 0 moves the metric
    assert (result[0, image] - corrupt_metric).abs().max() > 1e-4


def test_tokens_only_input_with_placeholders_fails_loudly(tiny, batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="no pixel_values"):
        model(batch.input_ids)


def test_tokens_to_residual_directions_and_accumulated_bias(tiny):
    model, _ = tiny
    red = model.to_single_token("red")
    torch.testing.assert_close(model.tokens_to_residual_directions(red), model.W_U[:, red])
    assert model.tokens_to_residual_directions(torch.tensor([[red, red]])).shape == (1, 2, 64)
    assert torch.all(model.accumulated_bias(2, mlp_input=True) == 0)


def test_text_only_forward_of_a_multimodal_model(tiny):
    model, _ = tiny
    logits = model("USER: What is the color of the circle?")
    assert logits.shape[:2] == model.to_tokens("USER: What is the color of the circle?").shape


def test_mha_tiny_model_stack_head_results(batch):
    model, _ = tiny_model(seed=1, n_kv_heads=None)
    _, cache = model.run_with_cache(batch, names_filter=lambda n: "result" not in n)
    heads = cache.stack_head_results(layer=1)
    with model.hook_switches(use_attn_result=True):
        _, full = model.run_with_cache(batch, names_filter="blocks.0.attn.hook_result")
    torch.testing.assert_close(heads, full["blocks.0.attn.hook_result"].permute(2, 0, 1, 3), atol=1e-5, rtol=1e-5)
