"""The logit lens against the HF model's hidden states, final norm and lm_head."""

from __future__ import annotations

import doctest
import importlib
import inspect

import pytest
import torch
from conftest import assert_no_hooks, random_norm_twin
from torch.testing import assert_close

from analyses.lens.logit import logit_lens, token_ranks, top_k_table, word_forms
from analyses.readout import lens_positions


@pytest.fixture(scope="module")
def setup():
    """A tiny model whose RMSNorm weights are random (so a forgotten `g` shows), its HF twin, inputs."""
    model, hf, inputs = random_norm_twin(seed=3)
    return model, hf, inputs


def hf_reference(hf, inputs):
    """HF outputs and the final-layer residual before the final norm (HF's last hidden state is normed)."""
    captured = {}

    def keep_input(module, args, output):
        captured["x"] = args[0]  # returns None: the output is left alone

    handle = hf.model.language_model.norm.register_forward_hook(keep_input)
    try:
        with torch.no_grad():
            out = hf(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                pixel_values=inputs.pixel_values,
                output_hidden_states=True,
            )
    finally:
        handle.remove()
    return out, captured["x"]


def gather(x, pos):
    return x[torch.arange(x.shape[0])[:, None], pos]


def test_final_layer_equals_model_logits(setup):
    model, hf, inputs = setup
    out, _ = hf_reference(hf, inputs)
    for role in ("last", "image"):
        pos = lens_positions(inputs, role)
        lens = logit_lens(model, inputs, positions=role)
        assert lens.shape == (model.cfg.n_layers + 1, 2, pos.shape[1], model.cfg.d_vocab)
        with torch.no_grad():
            assert_close(lens[-1], gather(model(inputs), pos), rtol=0, atol=0)
        assert_close(lens[-1], gather(out.logits, pos), rtol=1e-5, atol=1e-5)
    assert_no_hooks(model)


def test_every_layer_matches_hf_hidden_states_through_norm_and_lm_head(setup):
    model, hf, inputs = setup
    out, pre_norm = hf_reference(hf, inputs)
    hidden = out.hidden_states
    n = model.cfg.n_layers
    assert len(hidden) == n + 1
    # transformers 5.x: the last hidden state is already through the final norm.
    assert_close(hidden[-1], hf.model.language_model.norm(pre_norm), rtol=1e-6, atol=1e-6)
    pos = lens_positions(inputs, "image")
    lens = logit_lens(model, inputs, positions="image")
    with torch.no_grad():
        expected = [hf.lm_head(hf.model.language_model.norm(h)) for h in [*hidden[:n], pre_norm]]
        raw = [hf.lm_head(h) for h in [*hidden[:n], pre_norm]]
    assert_close(lens, torch.stack([gather(e, pos) for e in expected]), rtol=1e-4, atol=1e-5)
    unnormed = logit_lens(model, inputs, positions="image", normalize=False)
    assert_close(unnormed, torch.stack([gather(r, pos) for r in raw]), rtol=1e-4, atol=1e-5)
    assert (unnormed - lens).abs().max() > 1e-2  # the two readouts really differ


def test_layer_subset_negative_index_and_explicit_positions(setup):
    model, _, inputs = setup
    full = logit_lens(model, inputs, positions="image")
    sub = logit_lens(model, inputs, positions="image", layers=[1, -1])
    assert_close(sub, full[[1, model.cfg.n_layers]], rtol=0, atol=1e-6)
    last = inputs.last
    explicit = logit_lens(model, inputs, positions=[-1])
    per_row = logit_lens(model, inputs, positions=last[:, None])
    assert_close(explicit, per_row, rtol=0, atol=0)
    assert_close(explicit, logit_lens(model, inputs, "last"), rtol=0, atol=0)
    assert_close(logit_lens(model, inputs, inputs.mask("image")), full, rtol=0, atol=0)


def test_rows_with_different_position_counts_raise(setup):
    model, _, inputs = setup
    counts = [len(p) for p in inputs.positions("question")]
    assert counts[0] != counts[1]
    with pytest.raises(ValueError, match="different number of positions"):
        logit_lens(model, inputs, positions="question")
    one_row = logit_lens(model, inputs[1], positions="question")
    assert one_row.shape[2] == counts[1]


def test_top_k_table_values(setup):
    model, _, inputs = setup
    pos = lens_positions(inputs, "image")
    lens = logit_lens(model, inputs, positions="image", layers=[0, 2])
    table = top_k_table(model, lens, k=3, layers=[0, 2], positions=pos)
    assert len(table) == 2 * 2 * pos.shape[1] * 3
    row = table[(table.layer == 2) & (table.batch == 1) & (table.position == int(pos[1, 5]))].sort_values("rank")
    values, ids = lens[1, 1, 5].topk(3)
    assert row.token_id.tolist() == ids.tolist()
    assert row.token.tolist() == model.tokenizer.convert_ids_to_tokens(ids.tolist())
    assert_close(torch.tensor(row.prob.to_numpy()), lens[1, 1, 5].softmax(-1)[ids], rtol=1e-5, atol=1e-7)
    assert_close(torch.tensor(row.logit.to_numpy()), values, rtol=0, atol=0)


def test_word_forms_track_lower_and_capitalised_and_skip_missing(setup):
    model, _, _ = setup
    tok = model.tokenizer
    assert word_forms(model, "is") == {"is": tok.convert_tokens_to_ids("is"), "Is": tok.convert_tokens_to_ids("Is")}
    assert word_forms(model, "Which") == {
        "which": tok.convert_tokens_to_ids("which"),
        "Which": tok.convert_tokens_to_ids("Which"),
    }
    assert word_forms(model, "red") == {"red": tok.convert_tokens_to_ids("red")}  # "Red" is <unk>: skipped


def test_token_ranks_match_manual_ranks(setup):
    model, _, inputs = setup
    lens = logit_lens(model, inputs, positions="last")
    table = token_ranks(model, lens, [["red", "is"], ["Which"]], positions=lens_positions(inputs, "last"))
    assert sorted(set(zip(table.batch, table.form, strict=True))) == [
        (0, "Is"),
        (0, "is"),
        (0, "red"),
        (1, "Which"),
        (1, "which"),
    ]
    assert len(table) == 5 * (model.cfg.n_layers + 1)
    for rec in table.itertuples():
        logits = lens[rec.layer, rec.batch, 0]
        manual_rank = int((logits.argsort(descending=True) == rec.token_id).nonzero()) + 1
        assert rec.rank == manual_rank
        assert rec.position == int(inputs.last[rec.batch])
        assert abs(rec.prob - float(logits.softmax(-1)[rec.token_id])) < 1e-6


def test_no_hooks_left_even_when_a_hook_raises(setup, monkeypatch):
    model, _, inputs = setup
    logit_lens(model, inputs, "image")
    assert_no_hooks(model)

    def broken(act, hook, store, select):
        raise RuntimeError("boom inside the hook")

    monkeypatch.setattr(importlib.import_module("analyses.readout"), "_keep", broken)
    with pytest.raises(RuntimeError, match="boom"):
        logit_lens(model, inputs, "last")
    assert_no_hooks(model)


MODULES = [
    "lens.logit",
    "readout",
    "lens.embedding",
    "attribution.scores",
    "attribution.contributions",
    "patch_maps.grid",
    "patch_maps.maps",
    "patch_maps.occlusion",
    "plotting.figures",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    """Every `>>>` example of an analysis module runs (its module docstring sets up `model`, `inputs`)."""
    module = importlib.import_module(f"analyses.{name}")
    monkeypatch.chdir(tmp_path)  # examples may save figures
    namespace, parser, ran = dict(vars(module)), doctest.DocTestParser(), 0
    documented = [obj for obj in vars(module).values() if getattr(obj, "__module__", None) == module.__name__]
    for obj in [module, *documented]:
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert "Example" in (inspect.getdoc(obj) or "") or obj.__name__.startswith("_"), obj.__name__
        for example in parser.get_examples(inspect.getdoc(obj) or ""):
            exec(compile(example.source, f"<{name}.{getattr(obj, '__name__', name)} example>", "exec"), namespace)
            ran += 1
    assert ran >= 5


def test_shapes_llava_answer_emerges_in_the_logit_lens(shapes_llava):
    from hooked_llava.shapes import ShapesWorld

    model = shapes_llava
    examples = [ShapesWorld(0).example(i, "Colour") for i in range(8)]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    lens = logit_lens(model, inputs, "last")
    with torch.no_grad():
        assert_close(lens[-1, :, 0], model(inputs)[:, -1], rtol=0, atol=0)
    table = token_ranks(model, lens, [[e.answer] for e in examples])
    best = table.groupby(["batch", "layer"])["rank"].min().unstack()
    # A trained model puts the answer far higher at the end than at the embedding.
    assert (best[model.cfg.n_layers] < best[0]).mean() >= 0.75


def test_out_of_range_layers_positions_and_k_raise(setup):
    """No argument wraps around: layers [100] / [-20] and position 1000 used to read layer 1, 7 and 65."""
    model, _, inputs = setup
    n, seq = model.cfg.n_layers, inputs.input_ids.shape[1]
    for layers, bad in (([100], 100), ([-20], -20), ([n + 1], n + 1), ([-(n + 2)], -(n + 2))):
        with pytest.raises(IndexError, match=rf"layer {bad} is out of range: valid layers are 0\.\.{n} \(or -{n + 1}"):
            logit_lens(model, inputs, layers=layers)
    assert_close(logit_lens(model, inputs, layers=[-(n + 1)]), logit_lens(model, inputs, layers=[0]), rtol=0, atol=0)
    for positions in ([1000], [-(seq + 1)], torch.tensor([[0], [seq]])):
        with pytest.raises(IndexError, match=rf"is out of range: the sequence has positions 0\.\.{seq - 1}"):
            logit_lens(model, inputs, positions=positions)
    with pytest.raises(ValueError, match=r"a position mask must be \[pos\] or \[batch, pos\]"):
        logit_lens(model, inputs, positions=torch.ones(2, seq + 1, dtype=torch.bool))
    lens = logit_lens(model, inputs, layers=[0])
    with pytest.raises(ValueError, match=rf"k must be in 1\.\.{model.cfg.d_vocab}, got 0"):
        top_k_table(model, lens, k=0)
    with pytest.raises(ValueError, match=rf"k must be in 1\.\.{model.cfg.d_vocab}, got {model.cfg.d_vocab + 1}"):
        top_k_table(model, lens, k=model.cfg.d_vocab + 1)


def test_unknown_words_raise_with_near_matches(setup):
    model, _, _ = setup
    with pytest.raises(
        ValueError, match=r"'Red' is not in the vocabulary \(the tokenizer maps it to '<unk>'\)\. Did you mean: 'red'"
    ):
        model.to_single_token("Red")
    with pytest.raises(
        ValueError, match=r"no form of 'notaword' is a single token: 'notaword' is not in the vocabulary"
    ):
        word_forms(model, "notaword")
    assert model.to_single_token("<unk>") == model.tokenizer.unk_token_id  # asking for <unk> itself is fine


def test_shapes_llava_unknown_words_raise(shapes_llava):
    """On the shipped Shapes model: "Red" and "notaword" used to return the `<unk>` id."""
    model = shapes_llava
    with pytest.raises(ValueError, match=r"'Red' is not in the vocabulary .*Did you mean: 'red'"):
        model.to_single_token("Red")
    with pytest.raises(ValueError, match=r"'notaword' is not in the vocabulary .*Did you mean: 'not'"):
        model.to_single_token("notaword")
    assert word_forms(model, "Red") == {"red": model.to_single_token("red")}
