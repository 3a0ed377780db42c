"""Issue #23, second pass: analysis arguments that could be misread, generation's arguments and the small
API errors that came from inside torch. Each test reproduces an audit finding and checks the fix against
an independent computation (a hand-masked HF forward, a manual loop) or a message that names the problem."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_knockout import hf_knockout
from torch.testing import assert_close

QUESTIONS = ["What is the color of the circle?", "Is the square red?"]


@pytest.fixture(scope="module")
def pair():
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=3, n_layers=2, d_model=32)


@pytest.fixture(scope="module")
def right(pair):
    """Two prompts of different lengths, padded on the right: row 1 ends before the last column."""
    from hooked_llava.testing import random_images

    inputs = pair[0].prepare(images=random_images(2, seed=4), questions=QUESTIONS, padding_side="right")
    assert int(inputs.last[1]) < inputs.shape[1] - 1
    return inputs


@pytest.fixture(scope="module")
def left(pair):
    from hooked_llava.testing import random_images

    return pair[0].prepare(images=random_images(2, seed=4), questions=QUESTIONS)


# --- analysis arguments -------------------------------------------------------------------------------------
def test_knockout_minus_one_is_each_rows_answer_on_a_right_padded_batch(pair, right):
    from analyses.information_flow.attention_knockout import knockout

    model, hf = pair
    image = right.input_ids == hf.config.image_token_id
    last = torch.zeros_like(image)
    last[torch.arange(2), right.attention_mask.sum(1) - 1] = True  # each row's last real token, by hand
    with torch.no_grad():
        ours = knockout(model, right, "image", [-1], layers=[0, 1])
    theirs = hf_knockout(hf, right, last, image, [0, 1])
    rows = torch.arange(2)
    assert_close(ours[rows, right.last], theirs[rows, right.last], atol=2e-5, rtol=1e-4)
    plain = model(right)
    assert (ours[1, right.last[1]] - plain[1, right.last[1]]).abs().max() > 1e-4  # row 1's answer was knocked out


def test_negative_positions_beyond_a_short_row_name_the_row(right):
    from analyses import ranges

    n = int(right.last[1]) + 1
    with pytest.raises(ranges.OutOfRange, match=f"row 1 has {n} tokens"):
        ranges.positions(right, [-(n + 1)])


def test_per_row_positions_mark_each_row_alone(left):
    rows = torch.tensor([[1, 2], [3, 4]])
    mask = left.as_mask(rows)
    assert mask.sum(1).tolist() == [2, 2] and mask[0, 1] and mask[1, 3] and not mask[0, 3]


def test_float_tensor_targets_are_refused(pair, left):
    from analyses.attribution.contributions import resolve_targets
    from analyses.attribution.scores import log_prob_increase

    model, _ = pair
    logits = torch.zeros(2, model.cfg.d_vocab)
    with pytest.raises(TypeError, match="must hold token ids.*torch.float32"):
        resolve_targets(model, torch.tensor([5.7, 3.2]), logits)
    with pytest.raises(TypeError, match="must hold token ids"):
        log_prob_increase(model, left, target=torch.tensor([5.0, 3.0]))
    with pytest.raises(ValueError, match=r"one per row \(2 rows\).*shape \(3,\)"):
        resolve_targets(model, torch.tensor([1, 2, 3]), logits)
    assert resolve_targets(model, torch.tensor([5, 3]), logits).tolist() == [5, 3]


def _metric(logits):
    return logits[:, -1].log_softmax(-1)[:, 5].mean()


def test_patching_refuses_a_clean_cache_of_another_layout(pair, left):
    from analyses.patching.activation import patch_residual
    from hooked_llava.testing import random_images

    model, _ = pair
    corrupted = left.with_pixels(model.prepare(images=random_images(2, seed=9), questions=QUESTIONS).pixel_values)
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    kwargs = dict(layers=[0, 1], positions=[-1], progress=False)
    bad = {
        "pos_slice": model.run_with_cache(left, names_filter=names, pos_slice=-1)[1],
        "batch": model.run_with_cache(left[[0]], names_filter=names)[1],
        "remove_batch_dim": model.run_with_cache(left[[0]], names_filter=names, remove_batch_dim=True)[1],
        "lacks": model.run_with_cache(left, names_filter=names[:1])[1],
    }
    for cache in bad.values():
        with pytest.raises(ValueError, match="remove_batch_dim|lacks|same batch size"):
            patch_residual(model, corrupted, cache, _metric, **kwargs)
    good = model.run_with_cache(left, names_filter=names)[1]
    assert_close(patch_residual(model, corrupted, good, _metric, **kwargs),
                 patch_residual(model, corrupted, left, _metric, **kwargs), equal_nan=True)  # fmt: skip


def test_patch_importance_reads_out_in_float64_and_warns_below_the_noise_floor(pair, left):
    from analyses.attribution.scores import log_prob_increase
    from analyses.patch_maps.grid import grid_positions
    from analyses.patch_maps.maps import _warn_below_noise, patch_importance

    model, _ = pair
    heat = patch_importance(model, left, heads=[(1, 0)], progress=False)
    assert heat.dtype == torch.float32  # read out in float64 by default, returned at the model's precision
    assert torch.equal(heat, patch_importance(model, left, heads=[(1, 0)], dtype=torch.float64).float())
    raw = log_prob_increase(model, left, unit="position", head=(1, 0), dtype=torch.float64)  # independent readout
    scores = raw.gather(1, grid_positions(left).to(raw.device))
    low, high = scores.amin(1, keepdim=True), scores.amax(1, keepdim=True)
    expected = (scores - low) / (high - low)
    assert_close(heat.flatten(1), (expected / expected.sum(1, keepdim=True)).float())
    noise = torch.tensor([[0.0, 3e-6, 1e-6], [0.0, 0.5, 1.0]], dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"row\(s\) \[0\].*noise floor"):
        _warn_below_noise(noise, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_below_noise(noise, torch.float64)  # float64 resolves a 3e-6 spread: no warning


def test_logit_attrs_warn_once_when_the_norm_is_not_folded(left):
    from conftest import random_norm_twin

    model, _, inputs = random_norm_twin(seed=11)
    _, cache = model.run_with_cache(inputs)
    stack = cache.decompose_resid(return_labels=False)
    token = int(model(inputs)[0, -1].argmax())
    with pytest.warns(UserWarning, match="not folded.*do not sum to the logit") as record:
        cache.logit_attrs(stack, token)
        cache.decompose_resid(apply_ln=True)
    assert sum("not folded" in str(w.message) for w in record) == 1  # once per cache
    model.process_weights(fold_ln=True, center_unembed=False, fold_value_biases=False)
    logits, cache = model.run_with_cache(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attrs = cache.logit_attrs(cache.decompose_resid(return_labels=False), token)
    assert_close(attrs.sum(0)[:, -1], logits[:, -1, token], atol=1e-4, rtol=1e-4)  # folded: exact


# --- generation ---------------------------------------------------------------------------------------------
def test_freq_penalty_works_past_the_vocabulary_size_and_matches_a_manual_count(pair):
    from hooked_llava.surface.generation import _sample

    model, _ = pair
    vocab = model.cfg.d_vocab
    tokens = torch.randint(0, vocab, (2, 3 * vocab))
    mask = torch.ones_like(tokens)
    mask[1, :10] = 0  # left padding is not counted
    logits = torch.randn(2, vocab)
    seen = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "multinomial", lambda p, n, generator=None: seen.setdefault("p", p)[:, :1] * 0)
        _sample(logits, 0.5, None, None, 0.7, tokens, None, mask)
    manual = logits.clone() / 0.5
    for b in range(2):
        for t, m in zip(tokens[b].tolist(), mask[b].tolist(), strict=True):
            manual[b, t] -= 0.7 * m
    assert_close(seen["p"], manual.softmax(-1))
    out = model.generate(torch.randint(5, vocab, (1, vocab + 3)), max_new_tokens=2, freq_penalty=1.0, verbose=False,
                         seed=0, stop_at_eos=False)  # fmt: skip
    assert out.shape == (1, vocab + 5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": 2.5}, "top_k must be a positive integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
        ({"temperature": -1.0}, "temperature must be a finite number 0 or more"),
        ({"temperature": float("nan")}, "temperature must be"),
        ({"top_p": 1.5}, "top_p must be a number in 0..1"),
        ({"freq_penalty": -0.1}, "freq_penalty must be"),
    ],
)
def test_generate_checks_its_arguments(pair, left, kwargs, match):
    from hooked_llava.surface.generation import _check_sampling

    args = {"max_new_tokens": 3, "top_k": None, "top_p": None, "temperature": 1.0, "freq_penalty": 0.0, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        _check_sampling(**args)  # the check itself (the test suite's runtime type checker catches wrong types first)
    if not any(isinstance(v, float) for k, v in kwargs.items() if k in ("top_k", "max_new_tokens")):
        with pytest.raises(ValueError, match=match):
            pair[0].generate(left, verbose=False, **kwargs)


# --- small API errors ---------------------------------------------------------------------------------------
def test_empty_layers_and_flows_name_the_argument(pair, left):
    from analyses import logit_lens
    from analyses.information_flow.attention_knockout import knockout_sweep

    model, _ = pair
    with pytest.raises(ValueError, match=r"layers is empty.*0\.\.2"):
        logit_lens(model, left, layers=[])
    with pytest.raises(ValueError, match="flows is empty"):
        knockout_sweep(model, left, flows=[], progress=False)


def test_pos_slice_out_of_range_names_the_range(pair, left):
    seq = left.shape[1]
    with pytest.raises(IndexError, match=f"pos_slice 1000 is out of range.*0..{seq - 1}"):
        pair[0].run_with_cache(left, pos_slice=1000)
    _, cache = pair[0].run_with_cache(left, pos_slice=-1, names_filter=["blocks.0.hook_resid_pre"])
    assert cache["blocks.0.hook_resid_pre"].shape[1] == 1


def test_a_text_row_taken_from_a_mixed_batch_runs_as_text(pair):
    from hooked_llava.testing import random_images

    model, _ = pair
    prompts = ["USER: <image>\nWhat is the color of the circle?\nASSISTANT:", "USER: Is the square red?\nASSISTANT:"]
    mixed = model.prepare(images=random_images(1, seed=4), prompts=prompts)
    text = mixed[1]
    assert text.pixel_values is None and mixed[0].pixel_values.shape[0] == 1
    with torch.no_grad():
        assert_close(model(text)[0], model(mixed)[1], atol=1e-5, rtol=1e-5)
