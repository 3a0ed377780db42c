"""TransformerLens parameter surface: `embed`/`unembed` modules, `state_dict()` under TL's names and
layouts (loading TL's own state dicts), and TL's weight-processing flags in `from_pretrained`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from einops import rearrange

from hooked_llava import HookedLlava
from hooked_llava.testing import tiny_model

N_HEADS, N_KV, D_HEAD, D_MODEL = 4, 2, 16, 64  # tiny_model's language model


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)


def _hf_lm(hf):
    return hf.model.language_model


def test_embed_and_unembed_are_modules_with_tl_layouts(tiny):
    model, hf = tiny
    assert model.embed.W_E is model.W_E and model.W_E.shape == (model.cfg.d_vocab, D_MODEL)
    assert torch.equal(model.W_E, _hf_lm(hf).embed_tokens.weight)
    assert model.unembed.W_U.shape == (D_MODEL, model.cfg.d_vocab_out)
    assert torch.equal(model.unembed.W_U, hf.lm_head.weight.T) and torch.equal(model.W_U, model.unembed.W_U)
    assert torch.equal(model.unembed.b_U, torch.zeros(model.cfg.d_vocab_out))
    assert torch.equal(model.b_U, model.unembed.b_U)
    x = torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(model.unembed(x), x @ hf.lm_head.weight.T)
        assert torch.equal(model.embed(torch.tensor([[1, 5]])), model.W_E[[1, 5]][None])


def test_state_dict_has_transformer_lens_names_and_layouts(tiny):
    model, hf = tiny
    sd, layer = model.state_dict(), _hf_lm(hf).layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    expected = {
        "embed.W_E": _hf_lm(hf).embed_tokens.weight,
        "blocks.1.ln1.w": layer.input_layernorm.weight,
        "blocks.1.ln2.w": layer.post_attention_layernorm.weight,
        "blocks.1.attn.W_Q": rearrange(attn.q_proj.weight, "(h d) m -> h m d", h=N_HEADS),
        "blocks.1.attn._W_K": rearrange(attn.k_proj.weight, "(h d) m -> h m d", h=N_KV),  # GQA, as TL
        "blocks.1.attn._W_V": rearrange(attn.v_proj.weight, "(h d) m -> h m d", h=N_KV),
        "blocks.1.attn.W_O": rearrange(attn.o_proj.weight, "m (h d) -> h d m", h=N_HEADS),
        "blocks.1.attn.b_Q": torch.zeros(N_HEADS, D_HEAD),
        "blocks.1.attn._b_K": torch.zeros(N_KV, D_HEAD),
        "blocks.1.attn._b_V": torch.zeros(N_KV, D_HEAD),
        "blocks.1.attn.b_O": torch.zeros(D_MODEL),
        "blocks.1.mlp.W_in": mlp.up_proj.weight.T,
        "blocks.1.mlp.W_gate": mlp.gate_proj.weight.T,
        "blocks.1.mlp.W_out": mlp.down_proj.weight.T,
        "blocks.1.mlp.b_in": torch.zeros(mlp.up_proj.weight.shape[0]),
        "blocks.1.mlp.b_out": torch.zeros(D_MODEL),
        "ln_final.w": _hf_lm(hf).norm.weight,
        "unembed.W_U": hf.lm_head.weight.T,
        "unembed.b_U": torch.zeros(model.cfg.d_vocab_out),
    }
    for key, value in expected.items():
        assert torch.equal(sd[key], value), key
    lm_keys = {k for k in sd if not k.startswith(("vision.", "projector."))}
    assert lm_keys == {k for k in expected if not k.startswith("blocks.")} | {
        k.replace("blocks.1.", f"blocks.{i}.") for k in expected if k.startswith("blocks.") for i in range(3)
    }
    assert "vision.blocks.0.attn.w_q" in sd  # the vision tower keeps its own names


def test_transformer_lens_4_converter_reads_our_state_dict_as_the_hf_weights(tiny):
    conversion = pytest.importorskip("transformer_lens.utilities.tl_checkpoint_conversion")
    model, hf = tiny
    lm = {k: v for k, v in model.state_dict().items() if not k.startswith(("vision.", "projector."))}
    cfg = SimpleNamespace(n_heads=N_HEADS, n_key_value_heads=N_KV, d_head=D_HEAD, d_model=D_MODEL)
    converted = conversion.convert_tl_checkpoint(lm, cfg)
    attn = _hf_lm(hf).layers[2].self_attn
    for ours, theirs in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
        assert torch.equal(converted[f"blocks.2.attn.{ours}.weight"], theirs.weight), ours
    assert torch.equal(converted["unembed.weight"], hf.lm_head.weight)


def test_own_state_dict_round_trips_into_a_fresh_model(tiny, batch):
    model, _ = tiny
    fresh = tiny_model(seed=1)[0]
    assert not torch.allclose(_logits(fresh, batch), _logits(model, batch))
    result = fresh.load_state_dict(model.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters(), strict=True))


def test_loading_nothing_reports_every_key_under_tl_names(tiny):
    model, _ = tiny
    fresh = tiny_model(seed=1)[0]
    before = fresh.W_Q.clone()
    result = fresh.load_state_dict({"blocks.0.attn.W_query": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["blocks.0.attn.W_query"]
    assert {"embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn._W_K", "blocks.2.mlp.W_gate", "unembed.W_U"} <= set(
        result.missing_keys
    )
    lm_missing = [k for k in result.missing_keys if not k.startswith(("vision.", "projector."))]
    assert not any(k.endswith((".w_q", ".w_u", ".w_in")) for k in lm_missing)
    assert torch.equal(fresh.W_Q, before)


def test_a_nonzero_bias_the_model_lacks_is_an_error(tiny):
    model, _ = tiny
    sd = model.state_dict()
    sd["blocks.0.attn.b_Q"] = torch.ones(N_HEADS, D_HEAD)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.b_Q is nonzero, but this model has no such bias"):
        tiny_model(seed=1)[0].load_state_dict(sd, strict=False)


def test_wrong_shapes_and_duplicate_spellings_are_errors(tiny):
    model, _ = tiny
    sd = model.state_dict()
    sd["blocks.0.attn.W_Q"] = sd["blocks.0.attn.W_Q"].transpose(1, 2)
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks\.0\.attn\.W_Q: .*\(4, 16, 64\).*\(4, 64, 16\)"):
        tiny_model(seed=1)[0].load_state_dict(sd)
    sd = model.state_dict()
    sd["blocks.0.attn.W_K"] = sd["blocks.0.attn._W_K"]
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\._W_K and blocks\.0\.attn\.W_K are the same parameter"):
        tiny_model(seed=1)[0].load_state_dict(sd)


def test_unprefixed_kv_names_load_into_a_gqa_model(tiny, batch):
    model, _ = tiny
    sd = {k.replace("._W_", ".W_").replace("._b_", ".b_"): v for k, v in model.state_dict().items()}
    fresh = tiny_model(seed=1)[0]
    assert fresh.load_state_dict(sd).missing_keys == []
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def _tiny_llama(**overrides):
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = LlamaConfig(**fields, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_transformer_lens_hooked_transformer_state_dict_loads_and_gives_its_logits():
    pytest.importorskip("transformer_lens.HookedTransformer", reason="HookedTransformer exists in TransformerLens 3")
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        **dict(n_layers=2, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=64, d_vocab=50, n_ctx=64),
        **dict(act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True),
        **dict(rotary_adjacent_pairs=False, rotary_dim=8, rotary_base=10000, final_rms=True, eps=1e-6),
    )
    torch.manual_seed(3)
    reference = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith(".w"):  # norms around 1, so a forgotten norm weight shows
                p.copy_(1 + 0.5 * torch.randn_like(p))
    model = HookedLlava.from_hf(_tiny_llama())
    result = model.load_state_dict(reference.state_dict(), strict=False)
    assert result.missing_keys == []
    assert {k.rsplit(".", 1)[1] for k in result.unexpected_keys} == {"mask", "IGNORE", "rotary_sin", "rotary_cos"}
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), reference(tokens), atol=1e-4, rtol=1e-4)
        back = HookedTransformer(cfg).eval()
        assert back.load_state_dict(model.state_dict(), strict=False).unexpected_keys == []
        torch.testing.assert_close(back(tokens), reference(tokens), atol=1e-5, rtol=1e-5)


def _log_probs(model, tokens):
    with torch.no_grad():
        return model(tokens).log_softmax(-1)


def test_center_writing_weights_is_a_no_op_with_a_warning_for_rmsnorm():
    hf = _tiny_llama()
    plain = HookedLlava.from_hf(hf)
    with pytest.warns(UserWarning, match="center_writing_weights skipped: the language model uses RMSNorm"):
        centred = HookedLlava.from_hf(hf, center_writing_weights=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), centred.parameters(), strict=True))


def test_refactor_factored_attn_matrices_is_refused_for_rotary_models(tiny, tmp_path):
    model, hf = tiny
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices is impossible with rotary embeddings"):
        HookedLlava.from_pretrained(tmp_path / "never-read", refactor_factored_attn_matrices=True)
    before = model.W_Q.clone()
    with pytest.raises(ValueError, match="QK matrix depends on the positions"):
        model.process_weights(refactor_factored_attn_matrices=True)
    assert torch.equal(model.W_Q, before)


def test_an_unknown_processing_flag_is_an_error():
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['fold_layernorm'\]; weight processing"):
        HookedLlava.from_hf(_tiny_llama(), fold_layernorm=True)


def test_fold_value_biases_moves_b_v_into_a_new_b_o_and_keeps_log_probs():
    from transformers import AutoModelForCausalLM

    from hooked_llava.testing import _text_config, tiny_llava_config

    config = _text_config("qwen2", tiny_llava_config().text_config)  # q/k/v biases, no output bias
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.v_proj.bias.normal_()
    plain = HookedLlava.from_hf(hf)
    folded = HookedLlava.from_hf(hf, fold_value_biases=True)
    tokens = torch.randint(0, config.vocab_size, (2, 8))
    torch.testing.assert_close(_log_probs(folded, tokens), _log_probs(plain, tokens), atol=1e-5, rtol=1e-5)
    for block, layer in zip(folded.blocks, hf.model.layers, strict=True):
        attn = layer.self_attn
        b_v = attn.v_proj.bias.view(N_KV, D_HEAD).repeat_interleave(N_HEADS // N_KV, dim=0)
        assert torch.equal(block.attn.b_V, torch.zeros(N_KV, D_HEAD))
        torch.testing.assert_close(block.attn.b_O, attn.o_proj.weight @ b_v.reshape(-1))
    assert "blocks.0.attn.b_O" in folded.state_dict() and plain.blocks[0].attn.b_o is None


def test_all_tl_processing_together_keeps_log_probs(tiny, batch):
    model, hf = tiny
    processed = HookedLlava.from_hf(
        hf, model.processor, fold_ln=True, center_unembed=True, fold_value_biases=True, center_writing_weights=False
    )
    torch.testing.assert_close(
        _logits(processed, batch).log_softmax(-1), _logits(model, batch).log_softmax(-1), atol=1e-5, rtol=1e-5
    )
    assert processed.cfg.normalization_type == "RMSPre"
    torch.testing.assert_close(processed.W_U.mean(-1), torch.zeros(D_MODEL), atol=1e-6, rtol=0)
