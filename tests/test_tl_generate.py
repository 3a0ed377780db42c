"""TransformerLens' `generate` surface: its defaults, return types, KV cache, EOS and sampling."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import PROMPTS, TEXTS, ids_by_hand

from hooked_llava.testing import random_images


# --- generate ----------------------------------------------------------------------------------
def test_generate_defaults_follow_transformer_lens(tiny):
    model, _ = tiny
    params = inspect.signature(model.generate).parameters
    defaults = {k: params[k].default for k in ("max_new_tokens", "stop_at_eos", "do_sample", "use_past_kv_cache")}
    assert defaults == {"max_new_tokens": 10, "stop_at_eos": True, "do_sample": True, "use_past_kv_cache": True}
    assert params["return_type"].default == "input" and params["verbose"].default is True
    sampled = model.generate(TEXTS[0], max_new_tokens=6, seed=3, verbose=False, return_type="tokens")
    explicit = model.generate(TEXTS[0], 6, do_sample=True, seed=3, verbose=False, return_type="tokens")
    assert torch.equal(sampled, explicit)


def test_generate_returns_text_for_text_and_tokens_for_tokens(tiny):
    model, _ = tiny
    kw = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    tokens = model.generate(model.to_tokens(TEXTS[0]), **kw)
    assert isinstance(tokens, torch.Tensor) and tokens.shape == (1, len(ids_by_hand(model, TEXTS[0])) + 4)
    text = model.generate(TEXTS[0], **kw)
    assert text == model.tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert model.generate(model.to_tokens(TEXTS[0]), return_type="str", **kw) == text
    assert torch.equal(model.generate(TEXTS[0], return_type="tokens", **kw), tokens)
    texts = model.generate(TEXTS, **kw)
    assert isinstance(texts, list) and texts[0] == text
    assert model.generate(TEXTS[:1], **kw) == [text]
    assert texts[1] == model.generate(TEXTS[1], **kw)  # the batch is padded on the left and masked
    with pytest.raises(ValueError, match="on the left"):
        model.generate(TEXTS, padding_side="right", **kw)
    with pytest.raises(ValueError, match="return_type"):
        model.generate(TEXTS[0], return_type="logits", **kw)


def test_generate_without_kv_cache_gives_the_same_tokens(tiny, batch):
    model, _ = tiny
    kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    cached = model.generate(batch, **kw)
    assert torch.equal(model.generate(batch, use_past_kv_cache=False, **kw), cached)
    with pytest.raises(ValueError, match="padding must be on the left"):
        model.generate(model.prepare(images=random_images(2, seed=1), prompts=PROMPTS, padding_side="right"), **kw)


def test_stop_at_eos_and_sampling_options(tiny, batch):
    model, _ = tiny
    n = batch.shape[1]
    greedy = model.generate(batch, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False)
    eos = int(greedy[0, n])
    ignored = model.generate(
        batch, max_new_tokens=5, do_sample=False, stop_at_eos=False, eos_token_id=eos, verbose=False
    )
    assert torch.equal(ignored, greedy)
    assert torch.equal(model.generate(batch, 5, temperature=0.0, stop_at_eos=False, verbose=False), greedy)
    penalised = model.generate(batch, 5, stop_at_eos=False, top_k=1, freq_penalty=1e4, verbose=False)
    for row in penalised.tolist():
        new = row[n:]
        assert len(set(new)) == len(new) and not set(new) & set(row[:n])
    with pytest.raises(ValueError, match="freq_penalty must be a finite number 0 or more"):
        model.generate(batch, 2, freq_penalty=-1.0, verbose=False)


def test_verbose_shows_a_progress_bar(tiny, capsys):
    model, _ = tiny
    model.generate(TEXTS[0], max_new_tokens=3, stop_at_eos=False, verbose=True)
    assert "3/3" in capsys.readouterr().err
    model.generate(TEXTS[0], max_new_tokens=3, stop_at_eos=False, verbose=False)
    assert capsys.readouterr().err == ""
