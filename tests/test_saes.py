"""SAELens SAEs spliced into HookedLlava (`hooked_llava.saes.splice`) and trained with SAELens's trainer.

Needs the `sae` extra (SAELens, which pins TransformerLens 3.x); without it only the import test runs.
"""

from __future__ import annotations

import importlib

import pytest
import torch

PROMPTS = [
    "USER: <image>\nWhat is the color of the circle?\nASSISTANT:",
    "USER: <image>\nIs the square red?\nASSISTANT:",
]
HOOK = "blocks.1.hook_resid_post"


def test_core_imports_without_sae_lens():
    for name in ("hooked_llava", "hooked_llava.saes.splice", "hooked_llava.saes.training"):
        importlib.import_module(name)  # SAELens is imported lazily, only where an SAE is built or trained


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="needs the sae extra: pip install -e '.[sae]'")


@pytest.fixture(scope="module")
def model(sae_lens):
    from hooked_llava.saes.splice import HookedSAELlava
    from hooked_llava.testing import tiny_hf_llava, tiny_processor

    hf = tiny_hf_llava(0)
    return HookedSAELlava.from_hf(hf, tiny_processor(32, 8, "default"))


@pytest.fixture(scope="module")
def inputs(model):
    from hooked_llava.testing import random_images

    return model.prepare(images=random_images(2, 32, 1), prompts=PROMPTS)


def make_sae(sae_lens, hook=HOOK, d_in=64, d_sae=96, seed=0):
    torch.manual_seed(seed)
    cfg = sae_lens.StandardSAEConfig(d_in=d_in, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    sae = sae_lens.StandardSAE(cfg)
    with torch.no_grad():  # a random SAE whose features fire: biases and weights away from zero
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.3)
    return sae


def test_error_term_keeps_the_forward_exact(model, inputs, sae_lens):
    sae = make_sae(sae_lens)
    plain = model(inputs)
    spliced = model.run_with_saes(inputs, saes=[sae], use_error_term=True)
    assert torch.allclose(spliced, plain, atol=1e-5)
    assert not torch.allclose(model.run_with_saes(inputs, saes=[sae]), plain, atol=1e-2)


def test_without_error_term_the_reconstruction_replaces_the_activation(model, inputs, sae_lens):
    sae = make_sae(sae_lens)
    expected = model.run_with_hooks(inputs, fwd_hooks=[(HOOK, lambda x, hook: sae.decode(sae.encode(x)))])
    assert torch.allclose(model.run_with_saes(inputs, saes=sae), expected, atol=1e-5)


def test_cache_holds_feature_activations_under_saelens_names(model, inputs, sae_lens):
    sae = make_sae(sae_lens)
    _, plain = model.run_with_cache(inputs, names_filter=[HOOK])
    _, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)
    acts = cache[f"{HOOK}.hook_sae_acts_post"]
    assert acts.shape == (*inputs.input_ids.shape, 96)
    assert torch.allclose(acts, sae.encode(plain[HOOK]), atol=1e-5)
    assert (acts[inputs.mask("image")] > 0).any() and (acts[inputs.mask("text")] > 0).any()
    for name in ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_recons", "hook_sae_error", "hook_sae_output"):
        assert f"{HOOK}.{name}" in cache
    assert torch.allclose(cache[f"{HOOK}.hook_sae_output"], plain[HOOK], atol=1e-5)


def test_editing_features_is_not_undone_by_the_error_term(model, inputs, sae_lens):
    sae = make_sae(sae_lens)
    image = inputs.mask("image")

    def ablate(acts, hook):
        return torch.where(image[..., None], torch.zeros_like(acts), acts)

    hooks = [(f"{HOOK}.hook_sae_acts_post", ablate)]
    edited = model.run_with_hooks_with_saes(inputs, saes=[sae], use_error_term=True, fwd_hooks=hooks)

    def expected_fn(x, hook):  # x - recons(x) + recons(features with the image positions zeroed)
        acts = sae.encode(x)
        return x - sae.decode(acts) + sae.decode(torch.where(image[..., None], torch.zeros_like(acts), acts))

    expected = model.run_with_hooks(inputs, fwd_hooks=[(HOOK, expected_fn)])
    assert torch.allclose(edited, expected, atol=1e-5)
    assert not torch.allclose(edited, model(inputs), atol=1e-3)


def test_add_and_reset_restore_the_plain_model(model, inputs, sae_lens):
    from hooked_llava.model.components import HookPoint

    plain = model(inputs)
    first, second = make_sae(sae_lens, seed=1), make_sae(sae_lens, seed=2)
    model.add_sae(first)
    assert model.acts_to_saes == {HOOK: first} and f"{HOOK}.hook_sae_acts_post" in model.hook_dict
    with model.saes(second):
        assert model.acts_to_saes[HOOK] is second
    assert model.acts_to_saes[HOOK] is first  # the context restores what was attached before
    model.reset_saes()
    assert model.acts_to_saes == {} and isinstance(model.blocks[1].hook_resid_post, HookPoint)
    assert HOOK in model.hook_dict and f"{HOOK}.hook_sae_acts_post" not in model.hook_dict
    assert torch.equal(model(inputs), plain)


def test_bad_saes_get_clear_messages(model, inputs, sae_lens):
    with pytest.raises(KeyError, match="unknown hook name"):
        model.add_sae(make_sae(sae_lens, hook="blocks.1.hook_resid_pots"))
    with pytest.raises(ValueError, match="reads vectors of size 32"):
        model.run_with_saes(inputs, saes=[make_sae(sae_lens, d_in=32)])
    assert model.acts_to_saes == {}  # detached even after the error
    with pytest.raises(KeyError, match="no SAE is attached"):
        model.reset_saes(HOOK)


def test_shipped_sae_loads_with_saelens_and_reconstructs_its_hook(sae_lens):
    import json

    from analyses.saes.card import reconstruction_stats
    from hooked_llava.saes.splice import HookedSAELlava
    from hooked_llava.shapes import ShapesWorld, checkpoint_path

    folder = checkpoint_path("shapes-llava-sae")
    sae = sae_lens.SAE.load_from_disk(folder)
    assert sae.cfg.metadata.hook_name == "blocks.4.hook_resid_post" and sae.cfg.d_sae == 1024
    model = HookedSAELlava.from_pretrained("shapes-llava")
    examples = [ShapesWorld(777).example(i, "Colour") for i in range(8)]
    stats = reconstruction_stats(model, sae, examples)
    assert stats["fve"] >= 0.8 and stats["mean_l0"] == pytest.approx(sae.cfg.k, abs=0.5)
    card = (folder / "README.md").read_text()
    metrics = json.loads((folder / "eval.json").read_text())
    assert f"{100 * metrics['fve']:.1f} %" in card and metrics["fve"] >= 0.8
    assert abs(metrics["spliced"]["accuracy"] - metrics["original"]["accuracy"]) <= 5


def test_saes_splice_into_vision_hooks_too(model, inputs, sae_lens):
    hook = "vision.blocks.1.hook_resid_post"
    sae = make_sae(sae_lens, hook=hook, d_in=model.vision.cfg.d_model)
    plain = model(inputs)
    logits, cache = model.run_with_cache_with_saes(inputs, saes=[sae], use_error_term=True)
    assert torch.allclose(logits, plain, atol=1e-5)
    assert cache[f"{hook}.hook_sae_acts_post"].shape[:2] == (2, 17)  # images, CLS + 16 patches
    assert not torch.allclose(model.run_with_saes(inputs, saes=[sae]), plain, atol=1e-3)
