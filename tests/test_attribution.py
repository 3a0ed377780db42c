"""Log-probability increase and direct logit attribution against hand computations on the HF model."""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import SHORT_PROMPTS, assert_no_hooks, random_norm_twin
from torch.testing import assert_close

from analyses.attribution.contributions import head_vectors, position_vectors
from analyses.attribution.scores import direct_logit_attribution, log_prob_increase, top_heads, top_units


@pytest.fixture(scope="module")
def setup():
    """Tiny GQA model with random RMSNorm weights, its HF twin, and a left-padded batch."""
    model, hf, inputs = random_norm_twin(seed=5)
    return model, hf, inputs, reference(hf, inputs)


def reference(hf, inputs):
    """Everything the hand computations need, from HF forward hooks and outputs only."""
    lm, got = hf.model.language_model, {}

    def keep(key, use_input=False):
        def hook(module, args, output):
            got[key] = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [lm.norm.register_forward_hook(keep("final", use_input=True))]
    for i, layer in enumerate(lm.layers):
        handles += [
            layer.self_attn.register_forward_hook(keep(f"attn{i}")),
            layer.mlp.register_forward_hook(keep(f"mlp{i}")),
            layer.mlp.down_proj.register_forward_hook(keep(f"post{i}", use_input=True)),
        ]
    try:
        with torch.no_grad():
            out = hf(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                pixel_values=inputs.pixel_values,
                output_hidden_states=True,
                output_attentions=True,
            )
    finally:
        for h in handles:
            h.remove()
    return out, got


def frozen_log_prob(hf, u, final_last, y):
    """Study A's readout by hand: log softmax(W_U (g ⊙ u / sqrt(σ² + ε)))[y]."""
    sigma2 = final_last.pow(2).mean(-1)
    g, eps = hf.model.language_model.norm.weight, hf.config.text_config.rms_norm_eps
    with torch.no_grad():
        return hf.lm_head(g * u / torch.sqrt(sigma2 + eps)).log_softmax(-1)[..., y]


def per_position_head_vectors(hf, out, b, layer, head, last):
    """A[l, h][last, j] · v_j W_O^h for every j, from HF's attention weights, v_proj and o_proj."""
    cfg, attn = hf.config.text_config, hf.model.language_model.layers[layer]
    d_head = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        v = attn.self_attn.v_proj(attn.input_layernorm(out.hidden_states[layer][b]))
    v = v.view(v.shape[0], cfg.num_key_value_heads, d_head)
    v = v.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, dim=1)  # GQA: one kv per query head
    w_o = attn.self_attn.o_proj.weight[:, head * d_head : (head + 1) * d_head]  # [d_model, d_head]
    return (out.attentions[layer][b, head, last][:, None] * v[:, head]) @ w_o.T.detach()


@pytest.mark.parametrize("target", [None, "red", [21, "blue"]])
def test_head_scores_match_the_formula_by_hand(setup, target):
    model, hf, inputs, (out, got) = setup
    scores = log_prob_increase(model, inputs, unit="head", target=target)
    cfg = model.cfg
    assert scores.shape == (2, cfg.n_layers, cfg.n_heads)
    expected = torch.zeros_like(scores)
    for b, last in enumerate(inputs.last.tolist()):
        final = got["final"][b, last]
        y = (
            {None: int(out.logits[b, last].argmax()), "red": 21}.get(target)
            if not isinstance(target, list)
            else [21, 22][b]
        )
        for layer in range(cfg.n_layers):
            x = out.hidden_states[layer][b, last]
            for h in range(cfg.n_heads):
                v = per_position_head_vectors(hf, out, b, layer, h, last).sum(0)
                expected[b, layer, h] = frozen_log_prob(hf, x + v, final, y) - frozen_log_prob(hf, x, final, y)
    assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    assert scores.abs().max() > 1e-3


def test_position_scores_and_the_vector_identity(setup):
    model, hf, inputs, (out, got) = setup
    layer, head = 1, 3
    scores = log_prob_increase(model, inputs, unit="position", head=(layer, head))
    assert scores.shape == inputs.input_ids.shape
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n.startswith("blocks.") and ".attn.hook_" in n)
    rows = torch.arange(2)
    pattern_last = cache[f"blocks.{layer}.attn.hook_pattern"][rows, :, inputs.last]
    vectors = position_vectors(model, layer, head, pattern_last, cache[f"blocks.{layer}.attn.hook_v"])
    z_last = torch.stack([cache[f"blocks.{i}.attn.hook_z"][rows, inputs.last] for i in range(model.cfg.n_layers)], 1)
    for b, last in enumerate(inputs.last.tolist()):
        by_hand = per_position_head_vectors(hf, out, b, layer, head, last)
        assert_close(vectors[b], by_hand, rtol=1e-4, atol=1e-6)
        # Σ_j A·v_j W_O equals the head's result.
        assert_close(vectors[b].sum(0), head_vectors(model, z_last)[b, layer, head], rtol=1e-4, atol=1e-6)
        x, final, y = out.hidden_states[layer][b, last], got["final"][b, last], int(out.logits[b, last].argmax())
        expected = frozen_log_prob(hf, x + by_hand, final, y) - frozen_log_prob(hf, x, final, y)
        assert_close(scores[b], expected, rtol=1e-4, atol=1e-6)
    assert (scores[1][~inputs.attention_mask[1].bool()] == 0).all()  # padding gets nothing


def test_layer_scores_match_hf_hidden_states(setup):
    model, hf, inputs, (out, got) = setup
    table = log_prob_increase(model, inputs, unit="layer")
    assert list(table.columns) == ["batch", "layer", "component", "score"]
    assert len(table) == 2 * model.cfg.n_layers * 2
    for b, last in enumerate(inputs.last.tolist()):
        final, y = got["final"][b, last], int(out.logits[b, last].argmax())
        for layer in range(model.cfg.n_layers):
            x, attn = out.hidden_states[layer][b, last], got[f"attn{layer}"][b, last]
            expected = {
                "attn": frozen_log_prob(hf, x + attn, final, y) - frozen_log_prob(hf, x, final, y),
                "mlp": frozen_log_prob(hf, x + attn + got[f"mlp{layer}"][b, last], final, y)
                - frozen_log_prob(hf, x + attn, final, y),
            }
            for component, value in expected.items():
                row = table[(table.batch == b) & (table.layer == layer) & (table.component == component)]
                assert abs(float(row.score.iloc[0]) - float(value)) < 1e-5, (b, layer, component)


def test_neuron_scores_match_a_manual_loop(setup):
    model, hf, inputs, (out, got) = setup
    scores = log_prob_increase(model, inputs, unit="neuron", chunk_size=7)  # chunk edges inside each layer
    assert scores.shape == (2, model.cfg.n_layers, model.cfg.d_mlp)
    assert_close(scores, log_prob_increase(model, inputs, unit="neuron"), rtol=1e-5, atol=1e-6)
    for b, last in enumerate(inputs.last.tolist()):
        final, y = got["final"][b, last], int(out.logits[b, last].argmax())
        for layer, i in [(0, 0), (1, 6), (1, 7), (2, 64), (2, 127)]:
            x = out.hidden_states[layer][b, last] + got[f"attn{layer}"][b, last]
            w_down = hf.model.language_model.layers[layer].mlp.down_proj.weight.detach()
            v = got[f"post{layer}"][b, last, i] * w_down[:, i]
            expected = frozen_log_prob(hf, x + v, final, y) - frozen_log_prob(hf, x, final, y)
            assert abs(float(scores[b, layer, i]) - float(expected)) < 1e-5, (b, layer, i)


def test_top_head_and_neuron_tables(setup):
    model, _, inputs, _ = setup
    scores = log_prob_increase(model, inputs, unit="head")
    table = top_heads(scores, k=4)
    assert list(table.columns) == ["batch", "rank", "name", "layer", "head", "score"]
    for b in range(2):
        rows = table[table.batch == b]
        values, flat = scores[b].flatten().topk(4)
        assert rows.name.tolist() == [f"{i // model.cfg.n_heads}_{i % model.cfg.n_heads}" for i in flat.tolist()]
        assert_close(torch.tensor(rows.score.to_numpy()).float(), values, rtol=0, atol=0)
    neurons = top_units(
        torch.zeros(1, 2, 5).index_put_((torch.tensor([0]), torch.tensor([1]), torch.tensor([3])), torch.tensor(2.0)),
        k=1,
        kind="neuron",
    )
    assert neurons.name.tolist() == ["1_3"] and neurons.neuron.tolist() == [3]


@pytest.fixture(scope="module")
def folded(setup):
    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_processor

    _, hf, _, _ = setup
    return HookedLlava.from_hf(hf, tiny_processor(), fold_ln=True, center_unembed=False)


def test_dla_sums_to_the_logit_difference_with_folded_weights(setup, folded):
    model, hf, inputs, (out, got) = setup
    dla = direct_logit_attribution(folded, inputs, "red", "blue", unit="head")
    n, heads = model.cfg.n_layers, model.cfg.n_heads
    labels = ["embed", *[f"{i}_{h}" for i in range(n) for h in range(heads)], *[f"{i}_mlp" for i in range(n)]]
    assert dla[dla.batch == 0].component.tolist() == labels
    rows = torch.arange(2)
    diff = out.logits[rows, inputs.last, 21] - out.logits[rows, inputs.last, 22]
    assert_close(torch.tensor(dla.groupby("batch").attribution.sum().to_numpy()), diff, rtol=1e-4, atol=1e-5)
    by_layer = direct_logit_attribution(folded, inputs, "red", "blue", unit="layer")
    assert_close(torch.tensor(by_layer.groupby("batch").attribution.sum().to_numpy()), diff, rtol=1e-4, atol=1e-5)
    # One head by hand: its result over the final norm's scale, projected on g ⊙ (u_red − u_blue).
    g, eps = hf.model.language_model.norm.weight.detach(), hf.config.text_config.rms_norm_eps
    direction = (hf.lm_head.weight[21] - hf.lm_head.weight[22]).detach() * g
    for b, last in enumerate(inputs.last.tolist()):
        scale = torch.sqrt(got["final"][b, last].pow(2).mean() + eps)
        for head in range(heads):
            v = per_position_head_vectors(hf, out, b, 2, head, last).sum(0)
            value = dla[(dla.batch == b) & (dla.component == f"2_{head}")].attribution.iloc[0]
            assert abs(float(value) - float(v @ direction / scale)) < 1e-5


def test_dla_applies_the_norm_weight_itself_so_unfolded_agrees(setup, folded):
    model, _, inputs, _ = setup
    for unit in ("head", "layer"):
        a = direct_logit_attribution(folded, inputs, "red", "blue", unit=unit)
        b = direct_logit_attribution(model, inputs, "red", "blue", unit=unit)
        assert a.component.tolist() == b.component.tolist()
        assert_close(
            torch.tensor(b.attribution.to_numpy()), torch.tensor(a.attribution.to_numpy()), rtol=1e-4, atol=1e-5
        )
    top = direct_logit_attribution(model, inputs)  # default: the top-1 token's own logit
    assert_close(
        torch.tensor(top.groupby("batch").attribution.sum().to_numpy()),
        model(inputs)[torch.arange(2), inputs.last].max(-1).values.detach(),
        rtol=1e-4,
        atol=1e-5,
    )


def test_dla_keeps_attention_output_biases():
    from hooked_llava import HookedLlava
    from hooked_llava.testing import random_images, tiny_hf_llava, tiny_processor

    hf = tiny_hf_llava(seed=11, attention_bias=True)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "self_attn.o_proj.bias" in name:
                p.normal_(0, 0.5)  # HF initialises biases to zero
    model = HookedLlava.from_hf(hf, tiny_processor())
    inputs = model.prepare(images=random_images(2, seed=12), prompts=SHORT_PROMPTS)
    dla = direct_logit_attribution(model, inputs, "red", "blue")
    assert dla[dla.batch == 0].component.iloc[-1] == "attn_bias"
    assert dla[dla.component == "attn_bias"].attribution.abs().min() > 1e-4
    with torch.no_grad():
        logits = hf(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values
        ).logits
    rows = torch.arange(2)
    diff = logits[rows, inputs.last, 21] - logits[rows, inputs.last, 22]
    assert_close(torch.tensor(dla.groupby("batch").attribution.sum().to_numpy()), diff, rtol=1e-4, atol=1e-5)


CALLS = {
    "head": lambda m, x: log_prob_increase(m, x, unit="head"),
    "position": lambda m, x: log_prob_increase(m, x, unit="position", head=(0, 1)),
    "layer": lambda m, x: log_prob_increase(m, x, unit="layer"),
    "neuron": lambda m, x: log_prob_increase(m, x, unit="neuron"),
    "dla": lambda m, x: direct_logit_attribution(m, x, "red", "blue"),
}


@pytest.mark.parametrize("call", CALLS)
def test_no_hooks_left_even_when_a_hook_raises(setup, monkeypatch, call):
    model, _, inputs, _ = setup
    CALLS[call](model, inputs)
    assert_no_hooks(model)

    def broken(act, hook, store, select):
        raise RuntimeError("boom inside the hook")

    monkeypatch.setattr(importlib.import_module("analyses.readout"), "_keep", broken)
    with pytest.raises(RuntimeError, match="boom"):
        CALLS[call](model, inputs)
    assert_no_hooks(model)


def test_bad_arguments_say_what_to_do(setup):
    model, _, inputs, _ = setup
    with pytest.raises(ValueError, match="head=\\(layer, head\\)"):
        log_prob_increase(model, inputs, unit="position")
    with pytest.raises(ValueError, match="one per row"):
        log_prob_increase(model, inputs, target=[1, 2, 3])


def test_shapes_llava_attributions(shapes_llava):
    from hooked_llava.shapes import ShapesWorld

    model = shapes_llava
    examples = [ShapesWorld(0).example(i, "Colour") for i in range(4)]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    answers = [e.answer for e in examples]
    scores = log_prob_increase(model, inputs, unit="head", target=answers)
    assert torch.isfinite(scores).all() and scores.max() > 0.05  # some head raises the answer noticeably
    dla = direct_logit_attribution(model, inputs, answers)
    with torch.no_grad():
        logits = model(inputs)[torch.arange(len(examples)), inputs.last]
    expected = logits[torch.arange(len(examples)), [model.to_single_token(a) for a in answers]]
    assert_close(torch.tensor(dla.groupby("batch").attribution.sum().to_numpy()), expected, rtol=1e-3, atol=1e-3)


def frozen_scores_by_hand(model, x, v, final, y):
    """Study A's score in float64 from the model's own weights: log P(x + v)[y] − log P(x)[y]."""
    g, W_U = model.ln_final.w.double(), model.W_U.double()
    scale = (final.double().pow(2).mean(-1) + model.ln_final.eps).sqrt()
    x, v = x.double(), v.double()
    return ((g * (x + v) / scale) @ W_U).log_softmax(-1)[y] - ((g * x / scale) @ W_U).log_softmax(-1)[y]


def layer_scores_by_hand(model, inputs):
    """Attention-layer scores of every row, in float64, from the same last-position activations the
    analysis collects (two forward passes can differ by float32 rounding, which would hide the readout's)."""
    from analyses.attribution.contributions import run_at_last

    n = model.cfg.n_layers
    names = [f"blocks.{i}.{h}" for i in range(n) for h in ("hook_resid_pre", "hook_attn_out")]
    with torch.no_grad():
        acts = run_at_last(model, inputs, names)
        final = acts[f"blocks.{n - 1}.hook_resid_post"]
        y = (model.ln_final(final[:, None]) @ model.W_U)[:, 0].argmax(-1)
        scores = [
            [
                frozen_scores_by_hand(
                    model, acts[f"blocks.{i}.hook_resid_pre"][b], acts[f"blocks.{i}.hook_attn_out"][b], final[b], y[b]
                )
                for i in range(n)
            ]  # fmt: skip
            for b in range(len(inputs))
        ]
    return torch.tensor([[float(v) for v in row] for row in scores], dtype=torch.float64)


def attn_scores(table):
    attn = table[table.component == "attn"].sort_values(["batch", "layer"])
    return torch.tensor(attn.score.to_numpy()).reshape(2, -1)


def test_float64_model_reads_out_in_float64(setup):
    """A float64 model's scores equal an independent float64 computation to ~1e-12 (no cast to float32)."""
    import copy

    from hooked_llava import HookedLlava
    from hooked_llava.testing import tiny_processor

    _, hf, inputs, _ = setup
    model64 = HookedLlava.from_hf(copy.deepcopy(hf).double(), tiny_processor())
    heads = log_prob_increase(model64, inputs, unit="head")
    assert heads.dtype == torch.float64
    got, want = attn_scores(log_prob_increase(model64, inputs, unit="layer")), layer_scores_by_hand(model64, inputs)
    assert_close(got, want, atol=1e-12, rtol=0)


def test_float64_readout_on_a_float32_model_resolves_tiny_differences(setup):
    """dtype=float64 on a float32 model: scores equal the float64 hand formula to ~1e-12, where the
    default float32 readout is off by float32 rounding (> 1e-9 somewhere)."""
    model, _, inputs, _ = setup
    want = layer_scores_by_hand(model, inputs)
    got64 = attn_scores(log_prob_increase(model, inputs, unit="layer", dtype=torch.float64))
    assert_close(got64, want, atol=1e-12, rtol=0)
    got32 = attn_scores(log_prob_increase(model, inputs, unit="layer"))
    assert (got32 - want).abs().max() > 1e-9  # float32 cannot resolve below ~1e-7 nats
    heads = log_prob_increase(model, inputs, unit="head", dtype=torch.float64)
    assert heads.dtype == torch.float64 and log_prob_increase(model, inputs, unit="head").dtype == torch.float32
    positions = log_prob_increase(model, inputs, unit="position", head=(1, 3), dtype=torch.float64)
    assert (positions[1][~inputs.attention_mask[1].bool()] == 0).all()


def test_bad_indices_and_unknown_words_raise(setup):
    model, _, inputs, _ = setup
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with pytest.raises(IndexError, match=rf"layer {n_layers} is out of range: valid layers are 0\.\.{n_layers - 1}"):
        log_prob_increase(model, inputs, unit="position", head=(n_layers, 0))
    with pytest.raises(IndexError, match=rf"head -{n_heads + 1} is out of range: valid heads are 0\.\.{n_heads - 1}"):
        log_prob_increase(model, inputs, unit="position", head=(0, -(n_heads + 1)))
    assert_close(
        log_prob_increase(model, inputs, unit="position", head=(-1, -1)),
        log_prob_increase(model, inputs, unit="position", head=(n_layers - 1, n_heads - 1)),
    )
    with pytest.raises(IndexError, match=rf"token id {model.cfg.d_vocab} is out of range"):
        log_prob_increase(model, inputs, target=model.cfg.d_vocab)
    with pytest.raises(ValueError, match=r"'Red' is not in the vocabulary .*Did you mean: 'red'"):
        log_prob_increase(model, inputs, target="Red")
    with pytest.raises(ValueError, match=r"k must be in 1 or more, got 0"):
        top_heads(log_prob_increase(model, inputs), k=0)
    with pytest.raises(ValueError, match=r"chunk_size must be in 1 or more, got 0"):
        log_prob_increase(model, inputs, chunk_size=0)
