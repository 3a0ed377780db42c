"""Issue 12, items 6 (weights and config values) and 7: loading refuses what it cannot load unambiguously.

Each test reproduces one finding of the reliability audit: stray or duplicated weight files, index
entries outside the folder, broken tokenizer files, non-finite weights, nonsense configs. The hub
and local-looking paths (item 3) are in `test_reliability_hub.py`.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import logits_of, weights_folder
from safetensors.torch import save_file

from hooked_llava import CheckpointError, HookedLlava
from hooked_llava.model.config import InvalidConfigError

HEAD = "language_model.lm_head.weight"


# --- item 7: which weight files are read ---------------------------------------------------------


def test_a_stray_weight_file_beside_model_safetensors_is_ignored_with_a_warning(tiny, saved, state, tmp_path, batch):
    model, _ = tiny
    stray = {HEAD: torch.zeros_like(state[HEAD])}  # before the fix this silently replaced lm_head
    path = weights_folder(saved, tmp_path, {"model.safetensors": state, "model_v2.safetensors": stray})
    with pytest.warns(UserWarning, match="ignoring model_v2.safetensors"):
        loaded = HookedLlava.from_pretrained(path, processor=model.processor)
    assert torch.equal(loaded.W_U, model.W_U)
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))


def _halves(state):
    keys = sorted(state)
    return {k: state[k] for k in keys[: len(keys) // 2]}, {k: state[k] for k in keys[len(keys) // 2 :]}


def test_a_single_file_and_shards_without_an_index_are_ambiguous(saved, state, tmp_path):
    first, second = _halves(state)
    files = {"model.safetensors": state, "model-00001-of-00002.safetensors": first}
    path = weights_folder(saved, tmp_path, {**files, "model-00002-of-00002.safetensors": second})
    with pytest.raises(CheckpointError, match="more than one set of weights.*model.safetensors"):
        HookedLlava.from_pretrained(path)


def test_several_unconventional_weight_files_without_an_index_are_ambiguous(saved, state, tmp_path):
    first, second = _halves(state)
    path = weights_folder(saved, tmp_path, {"weights_a.safetensors": first, "weights_b.safetensors": second})
    with pytest.raises(CheckpointError, match="several .safetensors files.*ambiguous"):
        HookedLlava.from_pretrained(path)


def test_a_missing_shard_is_an_error_that_names_it(saved, state, tmp_path):
    first, _ = _halves(state)
    path = weights_folder(saved, tmp_path, {"model-00001-of-00002.safetensors": first})
    with pytest.raises(CheckpointError, match=r"lacks shard\(s\) \[2\]"):
        HookedLlava.from_pretrained(path)


def test_complete_shards_without_an_index_load(tiny, saved, state, tmp_path, batch):
    model, _ = tiny
    first, second = _halves(state)
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    loaded = HookedLlava.from_pretrained(weights_folder(saved, tmp_path, files), processor=model.processor)
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))


def test_a_key_in_two_shards_is_an_error_naming_the_key_and_both_files(saved, state, tmp_path):
    first, second = _halves(state)
    second = {**second, HEAD: torch.zeros_like(state[HEAD])} if HEAD in first else {**first, HEAD: state[HEAD]}
    files = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": second}
    path = weights_folder(saved, tmp_path, files)
    with pytest.raises(CheckpointError, match=f"'{HEAD}' is in both model-00001-of-00002.safetensors and model-00002"):
        HookedLlava.from_pretrained(path)


def test_a_key_in_two_indexed_shards_is_an_error(saved, state, tmp_path):
    first, second = _halves(state)
    index = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}
    extra = next(iter(second))
    path = weights_folder(
        saved, tmp_path, {"a.safetensors": {**first, extra: state[extra]}, "b.safetensors": second}, index
    )
    with pytest.raises(CheckpointError, match=f"'{extra}' is in both a.safetensors and b.safetensors"):
        HookedLlava.from_pretrained(path)


@pytest.mark.parametrize(
    "target", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../../outside.safetensors"]
)
def test_index_entries_outside_the_folder_are_refused(target, saved, state, tmp_path):
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "outside.safetensors")
    path = weights_folder(saved, tmp_path / "model", {}, {k: target for k in state})
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        HookedLlava.from_pretrained(path)


def test_an_index_that_misplaces_a_key_is_an_error(saved, state, tmp_path):
    first, second = _halves(state)
    moved = next(iter(second))
    index = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second} | {moved: "a.safetensors"}
    path = weights_folder(saved, tmp_path, {"a.safetensors": first, "b.safetensors": second}, index)
    with pytest.raises(CheckpointError, match=f"places '{moved}' in a.safetensors, but it is in b.safetensors"):
        HookedLlava.from_pretrained(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "processor_config.json"])
def test_a_malformed_processor_file_is_an_error_naming_it_unless_a_processor_is_passed(name, tiny, saved, tmp_path):
    model, _ = tiny
    path = tmp_path / "m"
    shutil.copytree(saved, path)
    (path / name).write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match=f"{name} is not valid JSON"):
        HookedLlava.from_pretrained(path)
    assert HookedLlava.from_pretrained(path, processor=model.processor).processor is model.processor


def test_processor_files_that_parse_but_do_not_load_are_an_error(tiny, saved, tmp_path):
    model, _ = tiny
    path = tmp_path / "m"
    shutil.copytree(saved, path)
    (path / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(CheckpointError, match="processor files in .* could not be loaded.*processor="):
        HookedLlava.from_pretrained(path)


def test_a_folder_without_processor_files_loads_with_no_processor(saved, state, tmp_path):
    assert HookedLlava.from_pretrained(weights_folder(saved, tmp_path, {"model.safetensors": state})).processor is None


def test_a_malformed_config_is_an_error_naming_it(saved, state, tmp_path):
    path = weights_folder(saved, tmp_path, {"model.safetensors": state})
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        HookedLlava.from_pretrained(path)


# --- item 6: non-finite weights and nonsense config values ---------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_an_error_naming_the_tensor(value, saved, state, tmp_path):
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    bad = state[key].clone()
    bad[0, 3] = value
    path = weights_folder(saved, tmp_path, {"model.safetensors": {**state, key: bad}})
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight' has 1 non-finite value"):
        HookedLlava.from_pretrained(path)


def test_non_finite_weights_in_an_hf_model_are_refused_by_from_hf():
    from hooked_llava.testing import tiny_hf_llava

    hf = tiny_hf_llava(seed=0)
    with torch.no_grad():
        hf.model.multi_modal_projector.linear_1.bias[2] = float("nan")
    with pytest.raises(CheckpointError, match=r"projector:'linear_1\.bias' has 1 non-finite"):
        HookedLlava.from_hf(hf)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("text_config", "rms_norm_eps", -1, "rms_norm_eps=-1 must be a finite number above 0"),
        ("text_config", "rms_norm_eps", 0, "rms_norm_eps=0 must be"),
        ("vision_config", "layer_norm_eps", -1e-5, "layer_norm_eps=-1e-05 must be"),
        ("text_config", "hidden_size", 0, "hidden_size=0 must be a positive integer"),
        ("text_config", "num_hidden_layers", -2, "num_hidden_layers=-2 must be a positive integer"),
        ("text_config", "vocab_size", 0, "vocab_size=0 must be"),
        ("text_config", "num_attention_heads", 5, r"\(64\) is not a multiple of the number of attention heads \(5\)"),
        (
            "text_config",
            "num_key_value_heads",
            3,
            r"num_key_value_heads=3 does not divide|heads \(4\) .*key.value heads \(3\)",
        ),
        ("text_config.rope_parameters", "rope_theta", -10000.0, "rope_theta=-10000.0 must be"),
        ("vision_config", "num_attention_heads", 3, r"\(32\) is not a multiple of the number of attention heads \(3\)"),
        ("vision_config", "patch_size", 64, "patch_size=64 is larger than image_size=32"),
        ("vision_config", "image_size", 0, "image_size=0 must be a positive integer"),
        (None, "image_token_id", 10_000, "image_token_id=10000 is not a token id"),
    ],
)
def test_nonsense_config_values_are_errors_naming_the_field(section, field, value, message, saved, tmp_path):
    config = json.loads((saved / "config.json").read_text())
    target = config
    for part in section.split(".") if section else []:
        target = target[part]
    target[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidConfigError, match=message):
        HookedLlava.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("text_config", "num_key_value_heads", 3, "num_key_value_heads=3 does not divide num_attention_heads=4"),
        ("vision_config", "num_attention_heads", 3, "num_attention_heads=3 does not divide hidden_size=32"),
        ("text_config", "rms_norm_eps", float("nan"), "rms_norm_eps=nan must be a finite number above 0"),
        ("text_config", "max_position_embeddings", 0, "max_position_embeddings=0 must be a positive integer"),
        ("vision_config", "num_channels", 0, "num_channels=0 must be a positive integer"),
    ],
)
def test_configs_edited_in_memory_are_checked_too(section, field, value, message):
    """transformers validates some fields when it reads config.json, but not when they are assigned later."""
    from hooked_llava.model.config import configs_from_hf
    from hooked_llava.testing import tiny_llava_config

    config = tiny_llava_config()
    setattr(getattr(config, section), field, value)
    with pytest.raises(InvalidConfigError, match=message):
        configs_from_hf(config)
