"""The Shapes activation source and SAELens's trainer on a tiny random HookedLlava (`hooked_llava.saes.training`)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hooked_llava.saes.training import ShapesActivations

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def model(tiny):
    return tiny[0]


def test_batches_are_the_hooks_activations_at_the_chosen_roles(model):
    source = ShapesActivations(model, HOOK, seed=3, batch_size=64, examples_per_batch=4, roles=["image"])
    examples = source.examples(2)
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    _, cache = model.run_with_cache(inputs)
    expected = cache[HOOK][inputs.mask("image")]  # 4 images x 16 patches
    assert torch.allclose(source.activations(examples), expected, atol=1e-6)
    batch = source.batch(2)
    assert batch.shape == (64, model.cfg.d_model)
    # a permutation of the image activations: every row is one of them, none twice
    match = torch.cdist(batch, expected).argmin(1)
    assert torch.allclose(batch, expected[match], atol=1e-6) and len(set(match.tolist())) == 64
    assert torch.equal(
        batch, ShapesActivations(model, HOOK, seed=3, batch_size=64, examples_per_batch=4, roles=["image"]).batch(2)
    )
    assert not torch.equal(batch, source.batch(3))


def test_iteration_resumes_at_start(model):
    source = ShapesActivations(model, HOOK, batch_size=32, examples_per_batch=2, start=5)
    assert torch.equal(next(source), source.batch(5)) and source.step == 6


def test_bad_sources_get_clear_messages(model):
    with pytest.raises(KeyError, match="unknown hook"):
        ShapesActivations(model, "blocks.1.hook_resid_pots")
    with pytest.raises(ValueError, match="raise examples_per_batch or lower batch_size"):
        ShapesActivations(model, HOOK, batch_size=10_000, examples_per_batch=1).batch(0)


def _mse(sae, batch):
    with torch.no_grad():
        return float((sae.decode(sae.encode(batch)) - batch).pow(2).sum(-1).mean())


def test_saelens_trainer_lowers_the_loss_and_resumes_exactly(model, tmp_path):
    pytest.importorskip("sae_lens", reason="needs the sae extra: pip install -e '.[sae]'")
    from sae_lens import SAE, TopKSAE

    from hooked_llava.saes.training import build_sae, train_sae

    kw = dict(d_sae=96, k=8, total_samples=128 * 12, batch_size=128, examples_per_batch=8, lr=3e-3, n_checkpoints=1)
    held_out = ShapesActivations(model, HOOK, seed=99, batch_size=128, examples_per_batch=8).batch(0)
    untrained = build_sae(64, HOOK, "tiny", d_sae=96, k=8, seed=0, device="cpu")
    sae = train_sae(model, HOOK, tmp_path / "a", **kw)
    assert isinstance(sae, TopKSAE) and sae.cfg.metadata.hook_name == HOOK
    assert _mse(sae, held_out) < 0.7 * _mse(untrained, held_out)
    reloaded = SAE.load_from_disk(tmp_path / "a")
    assert torch.equal(reloaded.W_enc, sae.W_enc)
    # resume from the mid-run checkpoint in a fresh folder: the same final weights as the uninterrupted run
    (checkpoint,) = (tmp_path / "a" / "checkpoints").iterdir()
    shutil.copytree(checkpoint, tmp_path / "b" / "checkpoints" / checkpoint.name)
    resumed = train_sae(model, HOOK, tmp_path / "b", **kw)
    assert torch.allclose(resumed.W_dec, sae.W_dec, atol=1e-6)
    # and it did start from the checkpoint: one with other weights ends elsewhere
    shutil.copytree(checkpoint, tmp_path / "c" / "checkpoints" / checkpoint.name)
    weights = tmp_path / "c" / "checkpoints" / checkpoint.name / "sae_weights.safetensors"
    state = load_file(weights)
    save_file({name: t.flip(0) if name == "W_dec" else t for name, t in state.items()}, weights)
    assert not torch.allclose(train_sae(model, HOOK, tmp_path / "c", **kw).W_dec, sae.W_dec, atol=1e-3)
