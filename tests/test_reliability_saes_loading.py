"""Issue #23, second pass: SAEs at switched-off, attention-pattern and user-hooked hook points, and loading
refuses non-floating weights and a processor config that disagrees with `config.json`.

The SAE tests use a minimal stand-in with SAELens's `SAE` interface (`cfg.d_in`, `cfg.metadata.hook_name`,
`encode`, `decode`, `hook_dict`, `use_error_term`), so they run without the optional `sae` extra."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import logits_of, weights_folder
from torch import nn
from torch.testing import assert_close
from transformer_lens.hook_points import HookPoint as TLHookPoint

from hooked_llava import CheckpointError, HookedLlava

HOOK = "blocks.1.hook_resid_post"


class StandInSAE(nn.Module):
    """A ReLU SAE with SAELens's interface and hook names (not SAELens's code)."""

    def __init__(self, hook: str, d_in: int, d_sae: int = 48, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.cfg = SimpleNamespace(d_in=d_in, d_sae=d_sae, metadata=SimpleNamespace(hook_name=hook, hook_name_out=None))
        self.W_enc = nn.Parameter(torch.randn(d_in, d_sae, generator=g) * 0.3)
        self.b_enc = nn.Parameter(torch.randn(d_sae, generator=g) * 0.5)
        self.W_dec = nn.Parameter(torch.randn(d_sae, d_in, generator=g) * 0.3)
        self.use_error_term = False
        names = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons", "hook_sae_output",
                 "hook_sae_error")  # fmt: skip
        self.hook_dict = {name: TLHookPoint() for name in names}

    def encode(self, x):
        pre = self.hook_dict["hook_sae_acts_pre"](self.hook_dict["hook_sae_input"](x) @ self.W_enc + self.b_enc)
        return self.hook_dict["hook_sae_acts_post"](pre.relu())

    def decode(self, acts):
        return self.hook_dict["hook_sae_recons"](acts @ self.W_dec)


@pytest.fixture(scope="module")
def sae_model():
    from hooked_llava.saes.splice import HookedSAELlava
    from hooked_llava.testing import random_images, tiny_hf_llava, tiny_processor

    model = HookedSAELlava.from_hf(tiny_hf_llava(0), tiny_processor(32, 8, "default"))
    prompts = [
        "USER: <image>\nWhat is the color of the circle?\nASSISTANT:",
        "USER: <image>\nIs the square red?\nASSISTANT:",
    ]
    return model, model.prepare(images=random_images(2, 32, 1), prompts=prompts)


def _by_hand(sae):
    return lambda x, hook: sae.decode(sae.encode(x))


@pytest.mark.parametrize(
    ("hook", "setter"),
    [("blocks.0.hook_mlp_in", "set_use_hook_mlp_in"), ("blocks.0.attn.hook_result", "set_use_attn_result")],
)
def test_an_sae_at_a_switched_off_hook_is_refused_and_works_once_switched_on(sae_model, hook, setter):
    model, inputs = sae_model
    sae = StandInSAE(hook, model.cfg.d_model)
    with pytest.raises(ValueError, match=f"an SAE at {hook} does not fire.*{setter}\\(True\\)"):
        model.run_with_saes(inputs, saes=[sae])
    assert model.acts_to_saes == {}
    getattr(model, setter)(True)
    try:
        spliced = model.run_with_saes(inputs, saes=[sae])
        expected = model.run_with_hooks(inputs, fwd_hooks=[(hook, _by_hand(sae))])
        assert_close(spliced, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(spliced, model(inputs), atol=1e-3)  # the SAE was applied
    finally:
        getattr(model, setter)(False)


@pytest.mark.parametrize("hook", ["blocks.0.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"])
def test_an_sae_at_an_attention_pattern_hook_is_refused_clearly(sae_model, hook):
    model, inputs = sae_model
    with pytest.raises(ValueError, match="not one vector per position: an SAE cannot read it"):
        model.run_with_saes(inputs, saes=[StandInSAE(hook, model.cfg.d_model)])
    assert model.acts_to_saes == {}


def test_a_permanent_user_hook_at_the_sae_point_keeps_firing(sae_model):
    model, inputs = sae_model
    sae, seen = StandInSAE(HOOK, model.cfg.d_model), []

    def record(x, hook):
        seen.append(x.detach().clone())
        return x

    model.add_hook(HOOK, record, is_permanent=True)
    try:
        plain = model(inputs)
        spliced = model.run_with_saes(inputs, saes=[sae])
        assert len(seen) == 2  # it fired with the SAE attached, on the SAE's output
        _, cache = model.run_with_cache(inputs, names_filter=[HOOK])
        assert_close(seen[1], sae.decode(sae.encode(cache[HOOK])), atol=1e-5, rtol=1e-5)
        assert_close(spliced, model.run_with_hooks(inputs, fwd_hooks=[(HOOK, _by_hand(sae))]), atol=1e-5, rtol=1e-5)
        assert_close(model(inputs), plain)
        assert len(seen) == 5  # it still fires after the SAE is detached (the cached and hooked runs fired it too)
    finally:
        model.reset_hooks(including_permanent=True)
    model(inputs)
    assert len(seen) == 5 and not model.hook_dict[HOOK].has_hooks()  # its handle still removed it


def test_error_term_keeps_the_stand_in_exact(sae_model):
    model, inputs = sae_model
    sae = StandInSAE(HOOK, model.cfg.d_model, seed=1)
    assert_close(model.run_with_saes(inputs, saes=[sae], use_error_term=True), model(inputs), atol=1e-5, rtol=1e-5)


# --- loading ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_floating_weights_are_refused(saved, state, tmp_path, dtype):
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    key = key if key in state else next(k for k in state if k.endswith("layers.0.mlp.up_proj.weight"))
    broken = {**state, key: state[key].round().to(dtype)}
    path = weights_folder(saved, tmp_path, {"model.safetensors": broken})
    with pytest.raises(CheckpointError, match=f"layers.0.mlp.up_proj.weight' is stored as {dtype}"):
        HookedLlava.from_pretrained(path)


def test_config_and_processor_config_that_disagree_are_refused_naming_the_fields(tiny, saved, state, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    processor_file = path / "processor_config.json"
    processor = json.loads(processor_file.read_text())
    processor.update(patch_size=4, vision_feature_select_strategy="full")
    processor_file.write_text(json.dumps(processor))
    with pytest.raises(CheckpointError, match="disagree.*vision_feature_select_strategy: config.json says 'default'"
                                              ".*patch_size: config.json says 8, the processor says 4"):  # fmt: skip
        HookedLlava.from_pretrained(path)
    loaded = HookedLlava.from_pretrained(path, processor=tiny[0].processor)  # your own processor: your choice
    batch = tiny[0].prepare(images=None, prompts=["USER: Is the square red?\nASSISTANT:"])
    assert torch.equal(logits_of(loaded, batch), logits_of(tiny[0], batch))


def test_config_image_token_and_image_size_are_checked(saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    config["image_token_id" if "image_token_id" in config else "image_token_index"] = 5
    config["vision_config"]["image_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"image token id: config.json says 5.*image size: config.json says \(64, 64\)"
    ):
        HookedLlava.from_pretrained(path)
