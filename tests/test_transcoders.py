"""Transcoders (`hooked_llava.transcoders`): format, loading, splicing, training and the shipped set.

The format is checked against files written the way circuit-tracer writes them (its hook suffixes,
a `k` tensor in TopK files, JumpReLU thresholds, skip connections), encode/decode against the formula
written out by hand, training for seeded resumption, and the shipped set against its card (`eval.json`)
on freshly drawn held-out questions.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from hooked_llava import HookedLlava
from hooked_llava.shapes import checkpoint_path
from hooked_llava.transcoders import JumpReLU, TopK, load_transcoders, save_transcoders
from hooked_llava.transcoders.card import evaluate
from hooked_llava.transcoders.splice import mlp_replacement_hooks
from hooked_llava.transcoders.train import LayerPairs, train_transcoders


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return HookedLlava.from_pretrained("shapes-llava")


def _write_circuit_tracer_set(folder, kind, n_layers=2, d=6, f=10, skip=False):
    """A set as circuit-tracer's `TranscoderSet.to_safetensors` + cache config write it."""
    gen = torch.Generator().manual_seed(1)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "scan": "test-scan",
    }
    if kind in ("relu", "topk"):
        config["activation"] = kind
    for layer in range(n_layers):
        state = {
            k: torch.randn(*shape, generator=gen)
            for k, shape in (("W_enc", (f, d)), ("W_dec", (f, d)), ("b_enc", (f,)), ("b_dec", (d,)))
        }
        if kind == "jumprelu":
            state["activation_function.threshold"] = torch.rand(f, generator=gen)
        if kind == "topk":
            state["k"] = torch.tensor(3)  # circuit-tracer stores k in the file; the config may omit it
        if skip:
            state["W_skip"] = torch.randn(d, d, generator=gen)
        save_file(state, str(folder / f"layer_{layer}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return state


def _by_hand(state, kind, x):
    pre = x @ state["W_enc"].T + state["b_enc"]
    if kind == "relu":
        acts = pre.clamp_min(0)
    elif kind == "jumprelu":
        acts = pre * (pre > state["activation_function.threshold"])
    else:
        keep = pre >= pre.topk(3, dim=-1).values[..., -1:]
        acts = (pre * keep).clamp_min(0)
    out = acts @ state["W_dec"] + state["b_dec"]
    return acts, out + (x @ state["W_skip"].T if "W_skip" in state else 0)


@pytest.mark.parametrize("kind,skip", [("relu", False), ("jumprelu", True), ("topk", False)])
def test_circuit_tracer_files_load_and_round_trip(tmp_path, kind, skip):
    (tmp_path / "a").mkdir()
    state = _write_circuit_tracer_set(tmp_path / "a", kind, skip=skip)
    ts = load_transcoders(tmp_path / "a")
    assert len(ts) == 2 and ts.scan == "test-scan"
    assert ts.feature_input_hook == "blocks.{layer}.ln2.hook_normalized"
    assert ts.feature_output_hook == "blocks.{layer}.hook_mlp_out"
    assert isinstance(ts[1].activation_function, {"relu": torch.nn.Module, "jumprelu": JumpReLU, "topk": TopK}[kind])
    x = torch.randn(4, 5, 6)
    acts, out = _by_hand(state, kind, x)
    torch.testing.assert_close(ts[1].encode(x), acts)
    torch.testing.assert_close(ts[1].decode(ts[1].encode(x), x), out)
    again = load_transcoders(save_transcoders(ts, tmp_path / "b"))
    saved = yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())
    assert saved["model_kind"] == "transcoder_set" and saved["feature_input_hook"] == "ln2.hook_normalized"
    torch.testing.assert_close(again[1](x), ts[1](x))


def test_bad_folders_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="no transcoder folder"):
        load_transcoders(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text("model_kind: cross_layer_transcoder\n")
    with pytest.raises(ValueError, match="transcoder_set"):
        load_transcoders(tmp_path)
    _write_circuit_tracer_set(tmp_path, "topk")
    save_file({"W_enc": torch.zeros(2, 6)}, str(tmp_path / "layer_1.safetensors"))
    with pytest.raises(ValueError, match="missing keys"):
        load_transcoders(tmp_path)


def test_shipped_set_is_not_a_model():
    folder = checkpoint_path("shapes-llava-transcoders")
    assert (folder / "config.yaml").is_file() and not (folder / "config.json").is_file()
    with pytest.raises(FileNotFoundError, match="not a shipped model"):
        HookedLlava.from_pretrained("shapes-llava-transcoders")


def test_splice_reproduces_the_mlp_with_its_error(model):
    """Transcoder + the clean error term in place of every MLP gives the clean logits; alone, it is close."""
    ts = load_transcoders("shapes-llava")
    source = LayerPairs(model)
    examples = source.examples(0)[:4]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    names = [ts.input_hook(i) for i in range(len(ts))] + [ts.output_hook(i) for i in range(len(ts))]
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs, names_filter=names)
        errors = {i: cache[ts.output_hook(i)] - ts[i](cache[ts.input_hook(i)]) for i in range(len(ts))}
        with model.hooks(fwd_hooks=mlp_replacement_hooks(ts, errors)):
            same = model(inputs)
    assert (same - logits).abs().max() < 1e-4


def test_training_is_seeded_and_resumes_exactly(model, tmp_path, monkeypatch):
    kw = dict(d_transcoder=32, k=4, total_samples=4 * 128, batch_size=128, examples_per_batch=4, checkpoint_every=1)
    whole = train_transcoders(model, tmp_path / "whole", **kw)
    real_next = LayerPairs.__next__

    def interrupted(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(LayerPairs, "__next__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_transcoders(model, tmp_path / "resumed", **kw)
    monkeypatch.setattr(LayerPairs, "__next__", real_next)
    resumed = train_transcoders(model, tmp_path / "resumed", **kw)
    for a, b in zip(whole, resumed):
        torch.testing.assert_close(a.W_enc, b.W_enc, rtol=0, atol=0)
        torch.testing.assert_close(a.W_dec, b.W_dec, rtol=0, atol=0)
    assert len(load_transcoders(tmp_path / "resumed")) == model.cfg.n_layers


def test_shipped_set_meets_its_card(model):
    """FVE, L0 and accuracy with every MLP replaced, recomputed on other held-out questions, match eval.json."""
    folder = checkpoint_path("shapes-llava-transcoders")
    card = json.loads((folder / "eval.json").read_text())
    ts = load_transcoders("shapes-llava")
    got = evaluate(model, ts, n_per_category=8, seed=card["eval_seed"] + 1)
    assert got["fve_overall"] >= 0.8 and card["fve_overall"] >= 0.8
    assert abs(got["fve_overall"] - card["fve_overall"]) < 0.03
    for layer, (fve, l0) in enumerate(zip(card["fve"], card["l0"])):
        assert abs(got["fve"][layer] - fve) < 0.05, layer
        assert abs(got["l0"][layer] - l0) < 1.0, layer
    assert abs(got["replaced"]["accuracy"] - card["replaced"]["accuracy"]) < 8
    assert got["original"]["accuracy"] - got["replaced"]["accuracy"] < 8
