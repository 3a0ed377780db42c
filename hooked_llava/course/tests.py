"""Checkers for the course exercises: `test_xxx(student_fn, model)` runs the student's function and the
solution on fresh scenes (other seeds than the notebooks'), raises an AssertionError that says what
differs, and prints a line when everything agrees. Where `analyses` or TransformerLens computes the
same thing, the student's answer is also compared with it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

import analyses
from analyses.information_flow import window_layers
from hooked_llava import HookedLlava
from hooked_llava.course import section1 as s1
from hooked_llava.course import section2 as s2
from hooked_llava.course import section3 as s3
from hooked_llava.course import section5 as s5
from hooked_llava.course import section6 as s6
from hooked_llava.course.common import FRESH_SEEDS, compare, fresh_colour_inputs, passed, swap_pair
from hooked_llava.shapes import ShapesWorld


def _cached(model: HookedLlava):
    for ex, inputs in fresh_colour_inputs(model):
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs)
        yield ex, inputs, cache


# --- Section 1 ---------------------------------------------------------------------------------
def test_image_positions(fn: Callable, model: HookedLlava) -> None:
    for _, inputs in fresh_colour_inputs(model):
        compare(fn(inputs), inputs.positions("image")[0], "image positions")
    passed("test_image_positions")


def test_patch_row_col(fn: Callable, model: HookedLlava) -> None:
    for _, inputs in fresh_colour_inputs(model):
        rc = inputs.patch_rc()[0]
        for pos in inputs.positions("image")[0].tolist()[::7]:
            compare(tuple(int(v) for v in fn(inputs, pos)), tuple(rc[pos].tolist()), f"(row, col) of position {pos}")
    passed("test_patch_row_col")


def test_merged_embedding(fn: Callable, model: HookedLlava) -> None:
    for _, inputs, cache in _cached(model):
        compare(fn(model, inputs, cache), cache["hook_embed"], "merged embedding vs cache['hook_embed']")
    passed("test_merged_embedding")


def test_attention_pattern(fn: Callable, model: HookedLlava) -> None:
    for _, _, cache in _cached(model):
        for layer in (0, model.cfg.n_layers - 1):
            compare(fn(cache, layer), cache[f"blocks.{layer}.attn.hook_pattern"], f"attention pattern of layer {layer}")
    passed("test_attention_pattern")


def test_resid_pre_from_parts(fn: Callable, model: HookedLlava) -> None:
    for _, _, cache in _cached(model):
        for layer in (0, 3, model.cfg.n_layers - 1):
            compare(fn(cache, layer), cache[f"blocks.{layer}.hook_resid_pre"], f"resid_pre of layer {layer}")
    passed("test_resid_pre_from_parts")


def test_answer_probability(fn: Callable, model: HookedLlava) -> None:
    for ex, inputs in fresh_colour_inputs(model):
        for word in (ex.answer, "green"):
            compare(
                torch.tensor(float(fn(model, inputs, word))),
                torch.tensor(s1.answer_probability(model, inputs, word)),
                f"probability of {word!r}",
                atol=1e-6,
            )
    passed("test_answer_probability")


# --- Section 2 ---------------------------------------------------------------------------------
def test_logit_lens(fn: Callable, model: HookedLlava) -> None:
    for _, inputs, cache in _cached(model):
        positions = torch.cat([inputs.positions("related")[0][:3], inputs.last[:1]])
        lens = analyses.logit_lens(model, inputs, positions[None])  # [layer, 1, n_pos, vocab]
        for layer in (0, 4, model.cfg.n_layers):
            compare(fn(model, cache, layer, positions), lens[layer, 0], f"logit lens at readout {layer}", atol=1e-3)
    passed("test_logit_lens")


def test_answer_ranks(fn: Callable, model: HookedLlava) -> None:
    for ex, inputs, cache in _cached(model):
        positions, token = inputs.positions("question")[0], model.to_single_token(ex.answer)
        compare(fn(model, cache, token, positions), s2.answer_ranks(model, cache, token, positions), "answer ranks")
    passed("test_answer_ranks")


def test_head_results(fn: Callable, model: HookedLlava) -> None:
    for _, _, cache in _cached(model):
        for layer in (1, model.cfg.n_layers - 1):
            got = fn(model, cache, layer)
            compare(got, s2.head_results(model, cache, layer), f"head results of layer {layer}")
            summed = got.sum(2) + model.b_O[layer]
            compare(summed, cache[f"blocks.{layer}.hook_attn_out"], "sum over heads + b_O vs attn_out", atol=1e-3)
    passed("test_head_results")


def test_head_dla(fn: Callable, model: HookedLlava) -> None:
    n, h = model.cfg.n_layers, model.cfg.n_heads
    for ex, inputs, cache in _cached(model):
        a, b = model.to_single_token(ex.answer), model.to_single_token("green" if ex.answer != "green" else "red")
        frame = analyses.direct_logit_attribution(model, inputs, a, b, unit="head").set_index("component")
        reference = torch.tensor(
            [frame.loc[f"{layer}_{head}", "attribution"] for layer in range(n) for head in range(h)]
        )
        compare(fn(model, cache, inputs, a, b), reference.reshape(n, h).float(), "head DLA", atol=1e-3)
    passed("test_head_dla")


# --- Section 3 ---------------------------------------------------------------------------------
def test_attention_to_object(fn: Callable, model: HookedLlava) -> None:
    for _, inputs, cache in _cached(model):
        compare(
            fn(cache, inputs, model.cfg.n_layers),
            s3.attention_to_object(cache, inputs, model.cfg.n_layers),
            "attention from the last position to the object's patches",
        )
    passed("test_attention_to_object")


def test_log_prob_increase_heads(fn: Callable, model: HookedLlava) -> None:
    for ex, inputs, cache in _cached(model):
        token = model.to_single_token(ex.answer)
        reference = analyses.log_prob_increase(model, inputs, unit="head", target=token)[0]
        compare(fn(model, cache, inputs, token), reference, "log-probability increase per head", atol=1e-3)
    passed("test_log_prob_increase_heads")


def test_zero_head_hook(fn: Callable, model: HookedLlava) -> None:
    for _, inputs in fresh_colour_inputs(model):
        for layer, head in ((0, 2), (model.cfg.n_layers - 2, 5)):
            with torch.no_grad():
                got = model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", partial(fn, head=head))])
                want = analyses.ablate_heads(model, inputs, [(layer, head)], method="zero")
            compare(got, want, f"logits with head {layer}_{head} zero-ablated", atol=1e-4)
    passed("test_zero_head_hook")


def test_ablation_drop(fn: Callable, model: HookedLlava) -> None:
    for ex, inputs in fresh_colour_inputs(model):
        token, other = (
            model.to_single_token(ex.answer),
            model.to_single_token("green" if ex.answer != "green" else "red"),
        )
        for layer, head in ((1, 3), (3, 0), (model.cfg.n_layers - 1, 0)):
            got = torch.tensor(float(fn(model, inputs, layer, head, token, other)))
            want = torch.tensor(s3.ablation_drop(model, inputs, layer, head, token, other))
            compare(got, want, f"drop of the logit difference for head {layer}_{head}", atol=1e-3)
    passed("test_ablation_drop")


# --- Section 4 ---------------------------------------------------------------------------------
def test_knockout_hook(fn: Callable, model: HookedLlava) -> None:
    for _, inputs in fresh_colour_inputs(model):
        for source, target, layers in (
            ("image", "last", [2, 3]),
            ("related", "question", [0, 1, 2]),
            ("question", "last", [5]),
        ):
            hook = partial(fn, source=inputs.mask(source), target=inputs.mask(target))
            with torch.no_grad():
                got = model.run_with_hooks(
                    inputs, fwd_hooks=[(f"blocks.{lay}.attn.hook_attn_scores", hook) for lay in layers]
                )
                want = analyses.knockout(model, inputs, source, target, layers)
            compare(got, want, f"logits with {source} -> {target} blocked in layers {layers}", atol=1e-4)
    passed("test_knockout_hook")


def test_window_layers(fn: Callable, model: HookedLlava) -> None:
    for n_layers in (8, 32):
        for window in (1, 2, 4, 9):
            for layer in range(n_layers):
                want = list(window_layers(layer, n_layers, window))
                compare(list(fn(layer, n_layers, window)), want, f"window {window}, layer {layer} of {n_layers}")
    passed("test_window_layers")


def test_knockout_change(fn: Callable, model: HookedLlava) -> None:
    for _, inputs in fresh_colour_inputs(model):
        for flow, window in (("question->last", 3), ("image->question", 1)):
            source, target = flow.split("->")
            sweep = analyses.knockout_sweep(model, inputs, flow, window=window, progress=False)
            want = torch.tensor(sweep.sort_values("layer")["rel_change"].to_numpy())
            compare(fn(model, inputs, source, target, window), want.float(), f"{flow}, window {window}", atol=1e-2)
    passed("test_knockout_change")


# --- Section 5 ---------------------------------------------------------------------------------
def _swap_cases(model: HookedLlava):
    for seed, colours in zip(FRESH_SEEDS, (("green", "yellow"), ("blue", "red")), strict=True):
        clean, corrupted = swap_pair(model, seed, colours)
        a, b = (model.to_single_token(c) for c in colours)
        last = int(clean.last[0])

        def metric(logits: torch.Tensor, a: int = a, b: int = b, last: int = last) -> torch.Tensor:
            return logits[0, last, a] - logits[0, last, b]

        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean)
            _, corrupt_cache = model.run_with_cache(corrupted)
        yield clean, corrupted, clean_cache, corrupt_cache, metric, (a, b)


def test_patch_position_hook(fn: Callable, model: HookedLlava) -> None:
    for clean, _, clean_cache, corrupt_cache, _, _ in _swap_cases(model):
        for name, position in (("blocks.0.hook_resid_pre", int(clean.positions("related")[0][0])), ("hook_embed", -1)):
            hook = model.hook_dict[name]
            got = fn(corrupt_cache[name].clone(), hook, position=position, clean_cache=clean_cache)
            want = s5.patch_position_hook(corrupt_cache[name].clone(), hook, position=position, clean_cache=clean_cache)
            compare(got, want, f"{name} patched at position {position}")
    passed("test_patch_position_hook")


def test_patch_residual_scan(fn: Callable, model: HookedLlava) -> None:
    for clean, corrupted, clean_cache, _, metric, _ in _swap_cases(model):
        positions = torch.cat([clean.positions("related")[0][:2], clean.last[:1]])
        reference = analyses.patch_residual(model, corrupted, clean, metric, positions=positions[None], progress=False)
        compare(
            fn(model, corrupted, clean_cache, metric, positions), reference[:, positions], "patched metric", atol=1e-3
        )
    passed("test_patch_residual_scan")


def test_attribution_residual(fn: Callable, model: HookedLlava) -> None:
    for clean, corrupted, clean_cache, _, metric, _ in _swap_cases(model):
        reference = analyses.attribute_residual(model, corrupted, clean, metric)
        compare(fn(model, clean_cache, corrupted, metric), reference, "attribution per (layer, position)", atol=1e-3)
    passed("test_attribution_residual")


def test_path_patch_direct(fn: Callable, model: HookedLlava) -> None:
    for clean, _, clean_cache, corrupt_cache, _, (a, b) in _swap_cases(model):
        positions = clean.positions("related")[0]
        for layer, head in ((2, 1), (model.cfg.n_layers - 1, 6)):
            args = (model, clean_cache, corrupt_cache, clean, layer, head, positions, a, b)
            got, want = torch.tensor(float(fn(*args))), torch.tensor(s5.path_patch_direct(*args))
            compare(got, want, f"direct path through head {layer}_{head}", atol=1e-4)
    passed("test_path_patch_direct")


# --- Section 6 ---------------------------------------------------------------------------------
def test_question_inputs(fn: Callable, model: HookedLlava) -> None:
    for seed in FRESH_SEEDS:
        ex = ShapesWorld(seed=seed).example(3, "Colour")
        for visual in (False, True) if model.vision is not None else (False,):
            got, want = fn(model, ex, visual), s6.question_inputs(model, ex, visual)
            compare(got.input_ids, want.input_ids, f"input ids ({'visual' if visual else 'text'} prompt)")
            if visual:
                compare(got.pixel_values, want.pixel_values, "pixel values")
    passed("test_question_inputs")


def test_mean_head_scores(fn: Callable, model: HookedLlava) -> None:
    examples = [ShapesWorld(seed=seed).example(4, "Colour") for seed in FRESH_SEEDS]
    for visual in (False, True) if model.vision is not None else (False,):
        got, want = fn(model, examples, visual), s6.mean_head_scores(model, examples, visual)
        compare(got, want, f"mean head scores ({'visual' if visual else 'text'} prompts)", atol=1e-4)
    passed("test_mean_head_scores")


def test_top_k_overlap(fn: Callable, model: HookedLlava) -> None:
    generator = torch.Generator().manual_seed(FRESH_SEEDS[0])
    for k in (1, 5, 10):
        a, b = torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)
        for x, y in ((a, b), (a, a), (a, -a)):
            compare(int(fn(x, y, k)), s6.top_k_overlap(x, y, k), f"top-{k} overlap")
    passed("test_top_k_overlap")


def test_rank_correlation(fn: Callable, model: HookedLlava) -> None:
    generator = torch.Generator().manual_seed(FRESH_SEEDS[1])
    a, b = torch.randn(8, 8, generator=generator), torch.randn(8, 8, generator=generator)
    for x, y in ((a, b), (a, a.exp()), (a, -a)):
        compare(
            torch.tensor(float(fn(x, y))), torch.tensor(s6.rank_correlation(x, y)), "Spearman correlation", atol=1e-6
        )
    passed("test_rank_correlation")
