"""The benchmarks in `bench/`: pristine HF baselines, interleaved timing, cache-bytes accounting and
extrapolation, and the GPU script's CPU-side logic. Tiny configs only; no timed assertions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import cache_memory as cm  # noqa: E402
import gpu_7b  # noqa: E402
import harness as h  # noqa: E402
import op_diff  # noqa: E402
import softmax_ab  # noqa: E402


@pytest.fixture(scope="module")
def models():
    return h.build_models("tiny", with_bridge=True)


@pytest.fixture(scope="module")
def inputs(models):
    return h.make_inputs(models, n_images=1)


def module_classes(model):
    return {name: type(mod) for name, mod in model.named_modules()}


def test_hf_baselines_stay_pristine_after_every_variant_ran(models, inputs):
    h.interleaved(h.variants(models, inputs), rounds=1, warmup=0)  # all set-up and one call of everything
    assert models.bridge is not None, "the bridge must be built for this test to mean anything"
    fresh = module_classes(h._hf_model(h.llava_config("tiny"), torch.float32))
    for label, baseline in models.hf_baselines().items():
        classes = module_classes(baseline)
        assert all(cls.__module__.startswith(("transformers.", "torch.")) for cls in classes.values()), label
        assert classes == fresh, f"{label} has other modules than a freshly built HF model"
        hooks = [f for m in baseline.modules() for d in (m._forward_hooks, m._forward_pre_hooks) for f in d.values()]
        assert all(f.__module__.startswith("transformers.") for f in hooks), label  # HF's own output capturing
    # The same check flags the bridge's own HF model, which boot_transformers edits in place.
    assert h.foreign_modules(models.bridge_hf)


def test_variants_share_no_weight_storage(models):
    def pointers(model):
        return {p.untyped_storage().data_ptr() for p in model.parameters()}

    groups = [pointers(models.eager), pointers(models.sdpa), pointers(models.hooked), pointers(models.bridge_hf)]
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            assert not a & b


def test_baselines_compute_the_same_logits(models, inputs):
    kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    with torch.no_grad():
        eager, sdpa, ours = models.eager(**kw).logits, models.sdpa(**kw).logits, models.hooked(inputs)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-4)


def test_rounds_are_interleaved_with_the_start_rotated():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    t = h.interleaved(runs, rounds=4, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab") + list("abc")
    assert t.rounds == 4 and all(len(v) == 4 for v in [*t.cpu.values(), *t.wall.values()])


def test_ratios_are_per_round_and_summarised_by_median_min_max():
    t = h.Timings(cpu={"x": [2.0, 3.0, 5.0], "base": [1.0, 2.0, 2.0]}, wall={}, orders=[[], [], []])
    assert t.ratios("x", "base") == [2.0, 1.5, 2.5]
    assert t.summary("x", "base") == (2.0, 1.5, 2.5)
    assert h.fmt_ratio(t.summary("x", "base")) == "2.00 [1.50–2.50]"


def test_real_width_config_has_llava_15_7b_widths():
    cfg = h.llava_config("real", lm_layers=2, vision_layers=2)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_attention_heads, t.intermediate_size, t.vocab_size) == (4096, 32, 11008, 32064)
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size, v.image_size, v.patch_size) == (
        1024,
        16,
        4096,
        336,
        14,
    )
    assert t.num_hidden_layers == 2 and v.num_hidden_layers == 2


@pytest.fixture(scope="module")
def tiny_cache(models, inputs):
    with torch.no_grad():
        _, cache = models.hooked.run_with_cache(inputs)
    return cache


def test_cache_table_accounts_every_tensor(tiny_cache, inputs, models):
    table = cm.cache_table(tiny_cache)
    assert len(table) == len(tiny_cache)
    assert table.nbytes.sum() == sum(t.nbytes for t in dict(tiny_cache.items()).values())
    # One entry checked against the config: the language model's pattern is [batch, head, pos, pos] in fp32.
    text = models.eager.config.text_config
    batch, pos = inputs.input_ids.shape
    row = table.set_index("hook").loc["blocks.1.attn.hook_pattern"]
    assert (row.part, row.layer, row.family) == ("lm", 1, "attn.hook_pattern")
    assert row["nbytes"] == batch * text.num_attention_heads * pos * pos * 4
    assert cm.split_name("vision.blocks.2.mlp.hook_post") == ("vision", 2, "mlp.hook_post")
    assert cm.split_name("projector.hook_out") == ("projector", None, "hook_out")


def test_symbolic_shape_names_dimensions_and_refuses_ambiguity():
    sizes = dict(pos=7, d_model=16, heads=4, kv_heads=2, d_head=4 * 2, d_mlp=32)
    assert cm.symbolic_shape((1, 7, 4, 8), sizes, "attn.hook_q") == ("batch", "pos", "heads", "d_head")
    assert cm.symbolic_shape((1, 7, 2, 8), sizes, "attn.hook_k") == ("batch", "pos", "kv_heads", "d_head")
    assert cm.symbolic_shape((1, 7, 1), sizes, "ln1.hook_scale") == ("batch", "pos", 1)
    mha = dict(sizes, kv_heads=4)
    assert cm.symbolic_shape((1, 7, 4, 8), mha, "attn.hook_v") == ("batch", "pos", "kv_heads", "d_head")
    with pytest.raises(ValueError, match="sizes are all distinct"):
        cm.symbolic_shape((1, 7, 16), dict(sizes, d_mlp=16), "mlp.hook_post")
    with pytest.raises(ValueError, match="no size"):
        cm.symbolic_shape((1, 9), sizes, "hook_resid_pre")


def test_extrapolating_to_the_measured_model_gives_back_its_cache(tiny_cache, inputs, models):
    table = cm.cache_table(tiny_cache)
    measured = cm.measured_sizes(models.eager.config, inputs.input_ids.shape[1])
    lm_layers, vision_layers = (table[table.part == p].layer.nunique() for p in ("lm", "vision"))
    same = dict(lm=measured["lm"], lm_layers=lm_layers, vision=measured["vision"], vision_layers=vision_layers, tiles=1)
    assert cm.extrapolate(table, measured, same).nbytes.sum() == table.nbytes.sum()


def test_extrapolation_scales_each_family_by_its_own_dimensions(tiny_cache, inputs, models):
    table = cm.cache_table(tiny_cache)
    measured = cm.measured_sizes(models.eager.config, inputs.input_ids.shape[1])
    lm = dict(measured["lm"], pos=2 * measured["lm"]["pos"], d_mlp=3 * measured["lm"]["d_mlp"])
    target = dict(lm=lm, lm_layers=10, vision=measured["vision"], vision_layers=1, tiles=1)
    ex = cm.extrapolate(table, measured, target).set_index(["part", "family"])
    layer0 = table[(table.part == "lm") & (table.layer == 0)].set_index("family").nbytes
    assert ex.loc[("lm", "attn.hook_pattern"), "nbytes"] == 10 * 4 * layer0["attn.hook_pattern"]  # pos²
    assert ex.loc[("lm", "hook_resid_pre"), "nbytes"] == 10 * 2 * layer0["hook_resid_pre"]  # pos
    assert ex.loc[("lm", "mlp.hook_post"), "nbytes"] == 10 * 6 * layer0["mlp.hook_post"]  # pos × d_mlp
    embed = table.set_index("hook").nbytes["hook_embed"]
    assert ex.loc[("lm", "hook_embed"), "nbytes"] == 2 * embed  # outside the blocks: counted once


def test_tl3_analytic_bytes_count_each_hook_of_a_block():
    pos, d, heads, mlp = 3, 8, 2, 5
    bf16 = 2 * (5 * pos * d + 6 * pos * d + 3 * pos * mlp)  # resid×5; q, k, v, rot_q, rot_k, z; mlp×3
    fp32 = 4 * (2 * heads * pos * pos + 2 * pos * d + 2 * pos)  # scores, pattern; ln normalized and scale
    assert cm.tl3_lm_layer_bytes(pos, d, heads, mlp) == bf16 + fp32


def test_gpu_script_runs_its_cpu_side_on_a_tiny_model(capsys):
    results = gpu_7b.main(["--device", "cpu", "--tiny", "--rounds", "1", "--dtype", "fp32"])
    assert set(results) == {
        "HF sdpa",
        "HF eager",
        "HookedLlava forward",
        "HookedLlava run_with_cache (default)",
        "HookedLlava run_with_cache (+hook_result)",
        "HookedLlava run_with_cache (resid only)",
    }
    assert all(r["peak"] is None and len(r["seconds"]) == 1 for r in results.values())
    assert "× eager" in capsys.readouterr().out


def test_gpu_script_switches_one_hf_model_between_eager_and_sdpa():
    hf, model, inputs = gpu_7b.build(
        gpu_7b.argparse.Namespace(tiny=True, dtype="fp32", lm_layers=2, vision_layers=2), torch.device("cpu")
    )
    kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    with torch.no_grad():
        eager = gpu_7b.hf_call(hf, kw, "eager")()
        assert hf.config._attn_implementation == "eager"
        assert hf.model.vision_tower.config._attn_implementation == "eager"
        sdpa = gpu_7b.hf_call(hf, kw, "sdpa")()
        assert hf.model.language_model.config._attn_implementation == "sdpa"
        torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model(inputs), eager, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_script_fails_fast_without_cuda():
    with pytest.raises(SystemExit, match="needs a CUDA GPU.*--device cpu --tiny"):
        gpu_7b.main([])


def test_median_ci_is_the_binomial_order_statistic_interval():
    values = [float(v) for v in range(1, 21)]  # n = 20: x_(6), x_(15) cover 95.9 %
    low, high, cov = h.median_ci(values)
    assert (low, high) == (6.0, 15.0)
    assert cov == pytest.approx(0.9586, abs=1e-4)
    assert h.median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0, 0.75)  # too few rounds for 95 %: min–max, said


def test_verdict_needs_the_whole_interval_below_the_target():
    assert h.verdict([1.0] * 20, 1.10).endswith(": met")
    assert h.verdict([1.2] * 20, 1.10).endswith(": not met")
    assert "not settled" in h.verdict([1.0, 1.2] * 10, 1.10)


def test_softmax_ab_times_both_softmaxes_and_restores_the_blockwise_one(capsys):
    from hooked_llava.model import attention

    blockwise = attention.softmax_fp32
    softmax_ab.main(["--config", "tiny", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "blockwise softmax" in out and "HF-style softmax" in out and "blockwise / HF-style:" in out
    assert attention.softmax_fp32 is blockwise


def test_paired_rounds_call_each_compared_pair_back_to_back_in_both_orders():
    names = ["e", "s", "f", "c", "x", "y"]
    pairs = [("e", "c"), ("s", "f")]
    orders = [h.paired(names, pairs, r) for r in range(4)]
    assert orders == [
        ["e", "c", "s", "f", "x", "y"],
        ["s", "f", "e", "c", "y", "x"],
        ["c", "e", "f", "s", "x", "y"],
        ["f", "s", "c", "e", "y", "x"],
    ]
    calls = []
    runs = {n: (lambda n=n: calls.append(n)) for n in names}
    t = h.interleaved(runs, rounds=4, warmup=0, pairs=pairs)
    assert t.orders == orders and calls == [n for o in orders for n in o]


def test_op_diff_counts_the_calls_flops_and_bytes_of_both_forwards(capsys):
    diff = op_diff.main(["--config", "tiny", "--images", "1", "--dtype", "fp32"])
    out = capsys.readouterr().out
    assert "aten calls:" in out and "FLOPs:" in out and "GiB read+written" in out
    assert (diff.hf_sdpa_calls != diff.hooked_calls).all()  # only the op kinds whose counts differ
    flash = diff[diff.op.str.contains("scaled_dot_product")]
    # the tiny model has 2 LM and 2 CLIP layers; ours stops at the feature layer -2, so runs one fewer
    assert flash.hf_sdpa_calls.sum() - flash.hooked_calls.sum() == 1


def test_op_log_counts_bytes_of_real_ops_and_none_for_views():
    log = op_diff.OpLog()
    x = torch.ones(4, 8)
    with log:
        x.view(8, 4)
        x + 1.0
    assert sum(log.calls.values()) == 2
    assert sum(log.bytes.values()) == 2 * 4 * 8 * 4  # the add reads x and writes a new tensor; the view moves nothing


def test_cold_rounds_release_free_memory_before_every_call(monkeypatch):
    calls = []
    monkeypatch.setattr(h, "release_free_memory", lambda: calls.append("trim"))
    runs = {n: (lambda n=n: calls.append(n)) for n in "ab"}
    h.interleaved(runs, rounds=2, warmup=1, cold=True)
    assert calls == ["a", "b", "trim", "a", "trim", "b", "trim", "b", "trim", "a"]
    h.release_free_memory()  # the real one runs (glibc) or does nothing, never raises
