"""SAE feature analyses (`analyses.saes.features`) on a tiny random model with a random SAELens SAE."""

from __future__ import annotations

import pytest
import torch

HOOK = "blocks.1.hook_resid_post"
QUESTIONS = ["What is the color of the circle?", "Is the square red or blue?"]


@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="needs the sae extra: pip install -e '.[sae]'")


@pytest.fixture(scope="module")
def model(sae_lens):
    from hooked_llava.saes.splice import HookedSAELlava
    from hooked_llava.testing import tiny_hf_llava, tiny_processor

    return HookedSAELlava.from_hf(tiny_hf_llava(0), tiny_processor(32, 8, "default"))


@pytest.fixture(scope="module")
def sae(sae_lens):
    torch.manual_seed(0)
    cfg = sae_lens.StandardSAEConfig(d_in=64, d_sae=48)
    cfg.metadata.hook_name = HOOK
    sae = sae_lens.StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
        sae.W_dec.normal_(0, 0.5)
    return sae


@pytest.fixture(scope="module")
def inputs(model):
    from hooked_llava.testing import random_images

    return model.prepare(images=random_images(2, 32, 1), questions=QUESTIONS)


def _encoded(model, sae, inputs):
    _, cache = model.run_with_cache(inputs, names_filter=[HOOK])
    return sae.encode(cache[HOOK]).detach()


def test_patch_map_is_the_feature_at_each_patch(model, sae, inputs):
    from analyses.saes.features import feature_patch_map

    acts = _encoded(model, sae, inputs)[..., 5]
    grid = feature_patch_map(model, sae, inputs, 5)
    rc = inputs.patch_rc()
    for b in range(2):
        for p in inputs.image_mask[b].nonzero()[:, 0].tolist():
            assert grid[b, rc[b, p, 0], rc[b, p, 1]] == pytest.approx(float(acts[b, p]), abs=1e-5)
    assert model.acts_to_saes == {}
    with pytest.raises(IndexError, match="the SAE has 48 features"):
        feature_patch_map(model, sae, inputs, 48)


def test_top_activations_are_the_largest_over_the_dataset(model, sae):
    from analyses.saes.features import top_activations
    from hooked_llava.shapes import ShapesWorld

    examples = [ShapesWorld(1).example(i, "Colour") for i in range(5)]
    table = top_activations(model, sae, examples, feature=3, k=6, batch_size=2)
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
    acts = _encoded(model, sae, inputs)[..., 3].masked_fill(~inputs.attention_mask.bool(), -1e9)
    assert table.activation.tolist() == pytest.approx(acts.flatten().topk(6).values.tolist(), abs=1e-4)
    rc, tok = inputs.patch_rc(), model.processor.tokenizer
    for r in table.itertuples():  # Colour prompts have equal lengths, so positions agree across batches
        if r.role == "image":
            assert inputs.image_mask[r.example, r.position] and (r.row, r.col) == tuple(
                rc[r.example, r.position].tolist()
            )
        else:
            assert r.token == tok.decode([int(inputs.input_ids[r.example, r.position])])


def test_ablation_at_image_positions_matches_an_independent_edit(model, sae, inputs):
    from analyses.saes.features import answer_log_prob, edit_features

    red = torch.tensor([model.to_single_token("red")] * 2)
    metric = answer_log_prob(red)
    image = inputs.mask("image")
    feats = _encoded(model, sae, inputs)[image].sum(0).topk(3).indices.tolist()  # active at the image positions
    table = edit_features(model, sae, inputs, feats, metric, positions="image")

    def expected_hook(x, hook):
        acts = sae.encode(x)
        edited = acts.clone()
        edited[..., feats] = torch.where(image[..., None], 0.0, acts[..., feats])
        return x - sae.decode(acts) + sae.decode(edited)

    expected = metric(model.run_with_hooks(inputs, fwd_hooks=[(HOOK, expected_hook)]), inputs)
    assert table.metric_after.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    assert table.metric_before.tolist() == pytest.approx(metric(model(inputs), inputs).tolist(), abs=1e-4)
    assert (table.change.abs() > 1e-4).all()
    steered = edit_features(model, sae, inputs, feats[:2], metric, positions=[3, 4], value=[0.0, 20.0])

    def steer_hook(x, hook):
        acts = sae.encode(x)
        edited = acts.clone()
        edited[:, [3, 4], feats[0]] = 0.0
        edited[:, [3, 4], feats[1]] = 20.0
        return x - sae.decode(acts) + sae.decode(edited)

    expected = metric(model.run_with_hooks(inputs, fwd_hooks=[(HOOK, steer_hook)]), inputs)
    assert steered.metric_after.tolist() == pytest.approx(expected.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="give one value, or one per feature"):
        edit_features(model, sae, inputs, feats, metric, value=[1.0])


def test_attribution_predicts_small_edits(model, sae, inputs):
    from analyses.saes.features import answer_log_prob, feature_attribution

    metric = answer_log_prob(torch.tensor([model.to_single_token("red")] * 2))
    attribution = feature_attribution(model, sae, inputs, metric, positions="image")
    assert attribution.shape == (2, 48)
    feature = int(attribution[0].abs().argmax())
    # scaling the feature by (1 - eps) at the image positions changes the metric by about -eps * attribution
    acts = _encoded(model, sae, inputs)[..., feature]
    assert (acts[inputs.mask("image")] > 0).any()
    eps = 1e-3

    def scale(x, hook):
        a = sae.encode(x)
        edited = a.clone()
        edited[..., feature] = torch.where(inputs.mask("image"), a[..., feature] * (1 - eps), a[..., feature])
        return x - sae.decode(a) + sae.decode(edited)

    with torch.no_grad():
        base = metric(model(inputs), inputs)
        moved = metric(model.run_with_hooks(inputs, fwd_hooks=[(HOOK, scale)]), inputs)
    assert (moved - base).tolist() == pytest.approx((-eps * attribution[:, feature]).tolist(), rel=0.05, abs=1e-6)
    assert all(p.grad is None for p in model.parameters()) and model.acts_to_saes == {}
