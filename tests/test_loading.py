"""Loading from save_pretrained directories, both key layouts, strict key accounting."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_llava import CheckpointError, HookedLlava
from hooked_llava.loading.pretrained import read_checkpoint


def _logits(model, batch):
    with torch.no_grad():
        return model(batch)


def test_sharded_directory_loads_with_identical_logits(tiny, saved, batch):
    model, _ = tiny
    assert len(list(saved.glob("*.safetensors"))) > 2, "the checkpoint must be sharded"
    loaded = HookedLlava.from_pretrained(saved)
    assert loaded.processor is not None
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))
    assert torch.equal(
        _logits(
            loaded,
            loaded.prepare(
                images=None,
                prompts=None,
                input_ids=batch.input_ids,
                pixel_values=batch.pixel_values,
                attention_mask=batch.attention_mask,
            ),
        ),
        _logits(model, batch),
    )


def test_on_disk_layout_is_the_legacy_one_and_transformers5_layout_also_loads(tiny, saved, tmp_path, batch):
    model, hf = tiny
    keys = read_checkpoint(saved)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    assert any(k.startswith("model.language_model.") for k in load_file(tmp_path / "model.safetensors"))
    loaded = HookedLlava.from_pretrained(tmp_path, processor=model.processor)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def _one_file_copy(saved, tmp_path, edit):
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    state = edit(dict(read_checkpoint(saved)))
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_key_is_an_error_that_names_it(saved, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    path = _one_file_copy(saved, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight"):
        HookedLlava.from_pretrained(path)


def test_unexpected_key_is_an_error_that_names_it(saved, tmp_path):
    path = _one_file_copy(saved, tmp_path, lambda s: {**s, "language_model.model.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="extra.weight"):
        HookedLlava.from_pretrained(path)


def test_wrong_shape_is_an_error(saved, tmp_path):
    key = "multi_modal_projector.linear_1.weight"
    path = _one_file_copy(saved, tmp_path, lambda s: {**s, key: torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="linear_1.weight.*shape"):
        HookedLlava.from_pretrained(path)


def test_pickled_weights_are_refused_unless_allowed(tiny, saved, tmp_path, batch):
    model, _ = tiny
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    torch.save(read_checkpoint(saved), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        HookedLlava.from_pretrained(tmp_path)
    loaded = HookedLlava.from_pretrained(tmp_path, allow_pickle=True, processor=model.processor)
    assert torch.equal(_logits(loaded, batch), _logits(model, batch))


def test_text_only_llama_loads_with_the_same_hook_names(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    model = HookedLlava.from_pretrained(tmp_path)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)
    assert model.vision is None and "blocks.1.attn.hook_pattern" in model.hook_dict


def test_unsupported_config_is_refused(saved, tmp_path):
    from hooked_llava import UnsupportedConfigError

    config = json.loads((saved / "config.json").read_text())
    config["text_config"]["hidden_act"] = "mish"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedConfigError, match="mish"):
        HookedLlava.from_pretrained(tmp_path)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not a shipped model"):
        HookedLlava.from_pretrained("nobody/no-such-model-xyz")
