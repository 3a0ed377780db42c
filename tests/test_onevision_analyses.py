"""The analyses and `explain` on a tiny LLaVA-OneVision checkpoint saved with a Qwen2-style tokenizer and
its processor, each checked against an independent computation (plain forwards with hand-made hooks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformer_lens import patching

from analyses.ablation import ablate_heads
from analyses.attribution.scores import log_prob_increase
from analyses.information_flow.attention_knockout import knockout, knockout_sweep
from analyses.lens.logit import logit_lens, top_k_table
from analyses.patch_maps.anyres import anyres_maps, token_importance
from analyses.patching.activation import patch_residual
from hooked_llava import HookedLlava
from hooked_llava.cli import main as cli
from hooked_llava.testing_onevision import tiny_pair


def _image(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model, hf = tiny_pair("onevision", seed=3, max_num_patches=1)  # downsampling on
    with torch.no_grad():  # a peaked head: greedy generation and the answer are not ties
        hf.model.language_model.embed_tokens.weight.mul_(8)
    folder = tmp_path_factory.mktemp("onevision")
    hf.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def ov(saved):
    folder, hf = saved
    return HookedLlava.from_pretrained(folder), hf


@pytest.fixture(scope="module")
def inputs(ov):
    model, _ = ov
    images = [[_image(64, 64)], [_image(40, 60, 1), _image(60, 40, 2)]]
    return model.prepare(questions=["What is the color?", "Which one is on the left?"], images=images)


def test_greedy_generation_equals_hf(ov, inputs):
    model, hf = ov
    ours = model.generate(inputs, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    ref = hf.generate(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        pixel_values=inputs.pixel_values,
        image_sizes=torch.tensor(inputs.image_sizes),
        batch_num_images=torch.tensor(inputs.batch_num_images),
        max_new_tokens=6,
        min_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
    )
    assert torch.equal(ours, ref)


def test_logit_lens_at_image_positions_is_the_norm_and_unembedding_of_the_cache(ov, inputs):
    model, _ = ov
    pos = inputs.positions("image")[0][-6:].tolist()
    lens = logit_lens(model, inputs, positions=pos, layers=[0, 1])
    _, cache = model.run_with_cache(inputs)
    for i, layer in enumerate([0, 1]):
        manual = model.unembed(model.ln_final(cache[f"blocks.{layer}.hook_resid_pre"][:, pos]))
        torch.testing.assert_close(lens[i], manual, atol=1e-5, rtol=1e-5)
    # tokens read as the tokenizer decodes them (" red"), not as its byte-level pieces ("Ġred")
    table = top_k_table(model, lens, k=5, layers=[0, 1])
    assert table.token.tolist() == model.tokenizer.batch_decode([[i] for i in table.token_id])
    assert any(model.tokenizer.convert_ids_to_tokens(int(i)) != t for i, t in zip(table.token_id, table.token))


def test_head_scores_are_the_frozen_readout_of_each_heads_result(ov, inputs):
    model, _ = ov
    scores = log_prob_increase(model, inputs, unit="head")
    with model.hook_switches(use_attn_result=True):
        logits, cache = model.run_with_cache(inputs)
    last, rows = inputs.last, torch.arange(len(inputs))
    y = logits[rows, last].argmax(-1)
    final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][rows, last]
    sigma = (final.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()[:, None]  # [batch, 1, 1]

    def logp(v):  # v: [batch, head, d] → log P(y) under the frozen readout
        logprobs = (model.ln_final.w * v / sigma @ model.W_U).log_softmax(-1)
        return logprobs.gather(-1, y[:, None, None].expand(-1, v.shape[1], 1))[..., 0]

    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.hook_resid_pre"][rows, last][:, None]  # [batch, 1, d]
        result = cache[f"blocks.{layer}.attn.hook_result"][rows, last]  # [batch, head, d]
        manual = logp(x + result) - logp(x.expand_as(result))
        torch.testing.assert_close(scores[:, layer], manual, atol=1e-4, rtol=1e-4)


def test_head_ablation_equals_zeroing_the_heads_z(ov, inputs):
    model, _ = ov
    ours = ablate_heads(model, inputs, [(1, 2)])

    def zero(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    manual = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_z", zero)])
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)
    assert (ours - model(inputs)).abs().max() > 1e-4


def test_knockout_of_image_to_last_equals_a_hand_made_mask(ov, inputs):
    model, _ = ov
    ours = knockout(model, inputs, "image", "last", layers=[0, 1])
    image, last = inputs.mask("image"), inputs.mask("last")
    block = (last[:, :, None] & image[:, None, :])[:, None]  # [batch, 1, query, key]

    def mask(scores, hook):
        return scores.masked_fill(block, torch.finfo(scores.dtype).min)

    hooks = [(f"blocks.{i}.attn.hook_attn_scores", mask) for i in (0, 1)]
    manual = model.run_with_hooks(inputs, fwd_hooks=hooks)
    torch.testing.assert_close(ours, manual, atol=1e-5, rtol=1e-5)


def test_knockout_sweep_rows_equal_single_knockouts(ov, inputs):
    model, _ = ov
    sweep = knockout_sweep(model, inputs, ["image->last", "question->last"], window=1, progress=False)
    for flow, (source, target) in {"image->last": ("image", "last"), "question->last": ("question", "last")}.items():
        row = sweep[(sweep.flow == flow) & (sweep.layer == 1) & (sweep.example == 1)].iloc[0]
        with torch.no_grad():
            logits = knockout(model, inputs[1], source, target, layers=[1])
            answer = int(model(inputs[1])[0, -1].argmax())
        assert abs(float(logits[0, -1].float().softmax(-1)[answer]) - row.p_blocked) < 1e-5
    moved = sweep[sweep.flow == "image->last"]
    assert (moved.p_blocked - moved.p_base).abs().max() > 1e-6  # blocking the images changes the answer's p


def test_patch_map_lays_downsampled_tokens_on_their_grid(ov, inputs):
    model, _ = ov
    scores = token_importance(model, inputs)
    maps = anyres_maps(inputs, scores)
    (packing, *_) = model.layouts(inputs.image_sizes, inputs.batch_num_images)
    assert packing.downsampled and maps[0]["highres"].shape == (packing.out_rows, packing.out_cols)
    table = inputs.image_map().query("row == 0 and kind == 'highres'")
    for t in table.itertuples():
        assert maps[0]["highres"][t.grid_row, t.grid_col] == scores[0, t.pos]
    assert abs(float(scores[0].sum()) - 1) < 1e-5 and abs(float(scores[1].sum()) - 1) < 1e-5


def test_activation_patching_and_transformer_lens_patching_match_a_manual_loop(ov, inputs):
    model, _ = ov
    clean = inputs[0]
    corrupt = clean.with_pixels(torch.flip(clean.pixel_values, dims=[-1]))
    answer = int(model(clean)[0, -1].argmax())
    metric = lambda logits: logits[0, -1, answer]  # noqa: E731
    _, clean_cache = model.run_with_cache(clean)
    positions = clean.positions("image")[0][-4:].tolist()
    ours = patch_residual(model, corrupt, clean, metric, positions=positions, progress=False)
    tl = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        for pos in positions:

            def hook(x, hook, pos=pos, name=name):
                x = x.clone()
                x[:, pos] = clean_cache[name][:, pos]
                return x

            manual = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)]))
            assert abs(float(ours[layer, pos]) - float(manual)) < 1e-4
            assert abs(float(tl[layer, pos]) - float(manual)) < 1e-4


def test_row_selection_keeps_each_rows_images(ov, inputs):
    model, _ = ov
    both = model(inputs)
    for row in range(2):
        alone = inputs[row]
        real = alone.attention_mask[0].bool()
        torch.testing.assert_close(
            model(alone)[0, real], both[row, inputs.attention_mask[row].bool()], atol=1e-5, rtol=0
        )
    assert inputs[1].batch_num_images == [2] and inputs[[1, 0]].batch_num_images == [2, 1]


def test_explain_cli_reports_the_models_answer(saved, tmp_path, capsys):
    folder, _ = saved
    image = tmp_path / "photo.png"
    _image(64, 64).save(image)
    out = tmp_path / "report"
    argv = ["explain", "--model", str(folder), "--image", str(image), "--question", "What is the color?"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert all(f'id="{s}"' in page for s in ("answer", "logit-lens", "heads", "patches", "knockout"))
    model = HookedLlava.from_pretrained(folder)
    inputs = model.prepare(questions=["What is the color?"], images=[Image.open(image)])
    probs = model(inputs)[0, -1].double().softmax(-1)
    said = capsys.readouterr().out
    assert f"{model.to_string(probs.argmax())!r}" in said and f"(p = {float(probs.max()):.3f})" in said
