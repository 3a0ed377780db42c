"""`generate` equals HF greedy generation token for token; sampling is seeded."""

from __future__ import annotations

import warnings

import pytest
import torch

from hooked_llava.testing import random_images, tiny_model


def _spiky(hf):
    """Random weights with a larger unembedding, so greedy decoding does not repeat one token."""
    with torch.no_grad():
        hf.lm_head.weight.mul_(40)
    return hf


def test_greedy_generation_equals_hf_for_20_tokens_with_padding():
    model, hf = tiny_model(seed=7)
    _spiky(hf)
    from hooked_llava import HookedLlava

    model = HookedLlava.from_hf(hf, model.processor)
    prompts = ["USER: <image>\nWhat is the color of the circle?\nASSISTANT:", "USER: <image>\nIs it?\nASSISTANT:"]
    inputs = model.prepare(images=random_images(2, seed=3), prompts=prompts)
    ours = model.generate(inputs, max_new_tokens=20, do_sample=False, stop_at_eos=False)
    ref = hf.generate(
        input_ids=inputs.input_ids,
        pixel_values=inputs.pixel_values,
        attention_mask=inputs.attention_mask,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        eos_token_id=None,
    )
    assert ours.shape == ref.shape == (2, inputs.input_ids.shape[1] + 20)
    assert torch.equal(ours, ref)
    assert len(set(ours[0, -20:].tolist())) > 2, "degenerate generation would make the test weak"


def test_generation_stops_at_eos_and_pads_finished_rows(tiny, batch):
    model, _ = tiny
    n = batch.input_ids.shape[1]
    first = model.generate(batch, max_new_tokens=1, do_sample=False, stop_at_eos=False)[:, n]
    eos = int(first[0])
    out = model.generate(batch, max_new_tokens=5, do_sample=False, eos_token_id=eos)
    assert out[0, n] == eos
    assert out[0, n + 1 :].eq(model.cfg.pad_token_id).all()
    assert out.shape[1] == (n + 1 if bool((first == eos).all()) else n + 5)


def test_sampling_is_reproducible_with_a_seed(tiny, batch):
    model, _ = tiny
    a = model.generate(batch, max_new_tokens=8, do_sample=True, seed=11, stop_at_eos=False, temperature=2.0)
    b = model.generate(batch, max_new_tokens=8, do_sample=True, seed=11, stop_at_eos=False, temperature=2.0)
    c = model.generate(batch, max_new_tokens=8, do_sample=True, seed=12, stop_at_eos=False, temperature=2.0)
    assert torch.equal(a, b) and not torch.equal(a, c)
    top1 = model.generate(batch, max_new_tokens=8, do_sample=True, seed=11, top_k=1, stop_at_eos=False)
    assert torch.equal(top1, model.generate(batch, max_new_tokens=8, do_sample=False, stop_at_eos=False))


def test_generation_stops_at_the_context_length():
    model, _ = tiny_model(seed=7, max_position_embeddings=40)
    inputs = model.prepare(images=random_images(1, seed=3), questions=["What is the color of the circle?"])
    n = inputs.input_ids.shape[1]
    room = 40 - n
    assert 0 < room < 20, "the prompt must leave some room, but less than asked for"
    # this used to run on to n + 20 tokens
    with pytest.warns(UserWarning, match=rf"max_new_tokens=20 would run past .* length of 40 .*at most {room} new"):
        capped = model.generate(inputs, max_new_tokens=20, do_sample=False, stop_at_eos=False)
    assert capped.shape == (1, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly filling the context is no reason to warn
        assert torch.equal(capped, model.generate(inputs, max_new_tokens=room, do_sample=False, stop_at_eos=False))


def test_generation_from_a_full_context_is_refused(tiny, batch):
    model, _ = tiny
    full = torch.ones(1, model.cfg.n_ctx, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"already fills the model's context length of {model.cfg.n_ctx}"):
        model.generate(full, max_new_tokens=1, do_sample=False)
    assert torch.equal(model.generate(full, max_new_tokens=0, do_sample=False), full)
    with pytest.raises(ValueError, match="max_new_tokens must be 0 or more"):
        model.generate(batch, max_new_tokens=-1)
