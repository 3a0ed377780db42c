"""Activation patching against hand-written loops and TransformerLens, attribution patching against
finite differences."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tl_patching
from conftest import assert_no_hooks
from torch.testing import assert_close

from analyses.patching.activation import (
    attribute_attn_out,
    attribute_heads,
    attribute_image_blocks,
    attribute_residual,
    check_pair,
    image_blocks,
    patch_attn_out,
    patch_groups,
    patch_heads,
    patch_image_blocks,
    patch_residual,
    to_frame,
)
from analyses.plotting.flows import plot_patch_grid, plot_patching

QUESTIONS = ["What is the color of the circle?", "Is the square red?"]
every = slice(None)


@pytest.fixture(scope="module")
def model():
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=8, n_layers=3)[0]


@pytest.fixture(scope="module")
def scenes(model):
    """(clean, corrupted): the same two prompts (left padded) over two different pairs of images."""
    from hooked_llava.testing import random_images

    clean = model.prepare(images=random_images(2, seed=9), questions=QUESTIONS)
    other = model.prepare(images=random_images(2, seed=10), questions=QUESTIONS)
    return clean, clean.with_pixels(other.pixel_values)


@pytest.fixture(scope="module")
def metric(model, scenes):
    rows, last, red = torch.arange(2), scenes[0].last, model.to_single_token("red")
    return lambda logits: logits[rows, last].log_softmax(-1)[:, red].mean()


def run(model, inputs, hooks=()):
    with torch.no_grad():
        return model.run_with_hooks(inputs, fwd_hooks=list(hooks))


def hand_patch(model, corrupted, clean_cache, metric, name, index):
    """The metric of the corrupted run with `act[index] = clean[index]` at hook `name`."""

    def hook(act, hook):
        act = act.clone()
        act[index] = clean_cache[name][index]
        return act

    return metric(run(model, corrupted, [(name, hook)]))


def test_noop_patch_returns_the_metric(model, scenes, metric):
    clean, _ = scenes
    value = metric(run(model, clean))
    for sweep in (patch_residual, patch_attn_out, patch_heads, patch_image_blocks):
        out = sweep(model, clean, clean, metric, progress=False)
        assert_close(out, value.expand_as(out), atol=1e-6, rtol=1e-6)


def test_patching_every_position_at_layer_0_gives_the_clean_logits(model, scenes):
    clean, corrupted = scenes
    everything = list(range(clean.shape[1]))
    out = patch_groups(model, corrupted, clean, lambda lg: lg, {"all": everything}, layers=[0], progress=False)
    assert out.shape == (3, 1, *clean.shape, model.cfg.d_vocab)
    assert_close(out[0, 0], run(model, clean), atol=1e-5, rtol=1e-5)
    assert torch.isnan(out[1:]).all()  # layers not swept
    assert (run(model, corrupted) - run(model, clean)).abs().max() > 1e-2


def test_residual_patching_equals_transformer_lens_and_a_hand_loop(model, scenes, metric):
    clean, corrupted = scenes
    _, cache = model.run_with_cache(clean)
    ours = patch_residual(model, corrupted, clean, metric, batch_size=5, progress=False)
    tl = tl_patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
    n_layers, n_pos = 3, clean.shape[1]
    hand = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        for p in range(n_pos):
            hand[layer, p] = hand_patch(model, corrupted, cache, metric, f"blocks.{layer}.hook_resid_pre", (every, p))
    assert_close(ours, hand, atol=1e-5, rtol=1e-5)
    assert_close(tl.to(hand), hand, atol=1e-5, rtol=1e-5)
    assert (hand - metric(run(model, corrupted))).abs().max() > 1e-3
    image = patch_residual(model, corrupted, cache, metric, positions="image", progress=False)  # a cache works too
    is_image = clean.mask("image").any(0)
    assert_close(image[:, is_image], hand[:, is_image], atol=1e-5, rtol=1e-5)
    assert torch.isnan(image[:, ~is_image]).all()


def test_attn_out_heads_and_blocks_equal_hand_loops(model, scenes, metric):
    clean, corrupted = scenes
    _, cache = model.run_with_cache(clean)
    attn = patch_attn_out(model, corrupted, clean, metric, layers=[1], positions=[3, 20, 28], progress=False)
    for p in (3, 20, 28):
        want = hand_patch(model, corrupted, cache, metric, "blocks.1.hook_attn_out", (every, p))
        assert_close(attn[1, p], want, atol=1e-5, rtol=1e-5)
    heads = patch_heads(model, corrupted, clean, metric, batch_size=3, progress=False)
    hand = torch.zeros(3, 4)
    for layer in range(3):
        for h in range(4):
            hand[layer, h] = hand_patch(
                model, corrupted, cache, metric, f"blocks.{layer}.attn.hook_z", (every, every, h)
            )
    assert_close(heads, hand, atol=1e-5, rtol=1e-5)
    blocks = patch_image_blocks(model, corrupted, clean, metric, size=2, progress=False)
    assert blocks.shape == (3, 4)  # a 4x4 patch grid in 2x2 blocks
    rc = clean.patch_rc()
    for b, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        mask = (rc[..., 0] // 2 == r) & (rc[..., 1] // 2 == c) & (rc[..., 0] >= 0)
        assert int(mask.sum()) == 2 * 4
        for layer in range(3):
            want = hand_patch(model, corrupted, cache, metric, f"blocks.{layer}.hook_resid_pre", mask)
            assert_close(blocks[layer, b], want, atol=1e-5, rtol=1e-5)


def test_attribution_equals_finite_differences(scenes):
    """Attribution is the derivative of the metric along (clean - corrupted) at the corrupted run."""
    from hooked_llava.testing import tiny_model

    model = tiny_model(seed=8, n_layers=3)[0].to(torch.float64)  # fp64 (norms stay fp32 inside)
    clean, corrupted = scenes[0][0], scenes[1][0]  # one row each: no padding
    red = model.to_single_token("red")
    metric = lambda lg: lg[0, -1].log_softmax(-1)[red]  # noqa: E731
    _, c_cache = model.run_with_cache(clean)
    _, x_cache = model.run_with_cache(corrupted)

    def derivative(name, index, h=1e-2):
        def at(t):
            def hook(act, hook):
                act = act.clone()
                act[index] = x_cache[name][index] + t * (c_cache[name][index] - x_cache[name][index])
                return act

            return metric(run(model, corrupted, [(name, hook)]))

        return (at(h) - at(-h)) / (2 * h)

    resid, attn = (
        attribute_residual(model, corrupted, clean, metric),
        attribute_attn_out(model, corrupted, clean, metric),
    )
    heads, blocks = (
        attribute_heads(model, corrupted, clean, metric),
        attribute_image_blocks(model, corrupted, clean, metric),
    )
    masks = list(image_blocks(corrupted, 2).values())
    checks = [
        (resid[0, 5], derivative("blocks.0.hook_resid_pre", (every, 5))),
        (resid[2, -1], derivative("blocks.2.hook_resid_pre", (every, -1))),
        (attn[1, 10], derivative("blocks.1.hook_attn_out", (every, 10))),
        (heads[1, 2], derivative("blocks.1.attn.hook_z", (every, every, 2))),
        (blocks[0, 3], derivative("blocks.0.hook_resid_pre", masks[3])),
    ]
    got, want = torch.stack([c[0] for c in checks]), torch.stack([c[1] for c in checks])
    assert_close(got, want.to(got), atol=1e-5, rtol=2e-3)
    assert want.abs().min() > 1e-4  # non-trivial derivatives


def test_layout_checks_labels_and_plots(model, scenes, metric):
    clean, corrupted = scenes
    with pytest.raises(ValueError, match="same length"):
        check_pair(clean, clean[0])
    result = patch_residual(model, corrupted, clean, metric, positions="question", progress=False)
    df = to_frame(result, "pos", clean)
    assert list(df.columns) == ["layer", "pos", "value", "role", "label"]
    assert len(df) == 3 * clean.shape[1]
    row0 = df[df.layer == 0]
    assert (row0.role == "image").sum() == 16 and row0.label.tolist()[clean.positions("image")[0][5]] == "img r1c1"
    assert row0.value.notna().sum() == int(clean.mask("question").any(0).sum())
    fig = plot_patching(result, labels=row0.label.tolist(), baseline=float(metric(run(model, corrupted))))
    assert len(fig.axes) == 2
    assert len(plot_patch_grid(torch.arange(4.0)).axes) == 2


def test_no_hooks_left_after_an_exception(model, scenes):
    clean, corrupted = scenes

    def bad_metric(logits):
        raise RuntimeError("metric failed")

    for sweep in (patch_residual, patch_heads, attribute_residual, attribute_heads):
        with pytest.raises(RuntimeError, match="metric failed"):
            sweep(model, corrupted, clean, bad_metric)
        assert_no_hooks(model)


def test_shapes_model_colour_patching():
    """On the trained Shapes model: the same scene with the asked-about object recoloured."""
    from hooked_llava.shapes import checkpoint_path

    if not checkpoint_path("shapes-llava").is_dir():
        pytest.skip("the shapes-llava checkpoint has not been built")
    from dataclasses import replace

    import numpy as np

    from hooked_llava import HookedLlava
    from hooked_llava.shapes import COLORS, ShapesWorld
    from hooked_llava.shapes.scene import render

    model = HookedLlava.from_pretrained("shapes-llava")
    example = ShapesWorld(0).example(0, "Colour")
    objects = example.scene.objects
    asked = next(o for o in objects if o.bbox in example.related_bboxes)
    other = next(c for c in COLORS if c != asked.color)
    recoloured = [replace(o, color=other) if o is asked else o for o in objects]
    images = [render(np.random.default_rng(0), objs) for objs in (objects, recoloured)]
    clean = model.prepare(images=images[:1], prompts=[example.prompt])
    corrupted = clean.with_pixels(model.prepare(images=images[1:], prompts=[example.prompt]).pixel_values)
    right, wrong = model.to_single_token(asked.color), model.to_single_token(other)
    metric = lambda lg: lg[0, -1, right] - lg[0, -1, wrong]  # noqa: E731
    out = patch_residual(model, corrupted, clean, metric, positions="image", progress=False)
    est = attribute_residual(model, corrupted, clean, metric)
    assert torch.isfinite(out[:, clean.mask("image")[0]]).all() and torch.isfinite(est).all()
    with torch.no_grad():
        assert metric(model(clean)) > metric(model(corrupted))  # the model reads the colour


def test_bad_indices_name_the_valid_range(model, scenes, metric):
    clean, corrupted = scenes
    seq = corrupted.shape[1]
    with pytest.raises(IndexError, match=rf"position 1000 is out of range: the sequence has positions 0\.\.{seq - 1}"):
        patch_residual(model, corrupted, clean, metric, positions=[1000], progress=False)
    with pytest.raises(IndexError, match=r"layer 3 is out of range: valid layers are 0\.\.2 \(or -3\.\.-1"):
        patch_residual(model, corrupted, clean, metric, layers=[3], positions="last", progress=False)
    with pytest.raises(IndexError, match=rf"position {seq} is out of range"):
        patch_groups(model, corrupted, clean, metric, {"x": [seq]}, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be in 1 or more, got 0"):
        patch_heads(model, corrupted, clean, metric, batch_size=0, progress=False)
    with pytest.raises(ValueError, match=rf"size must be in 1\.\.{corrupted.grid_size}, got 0"):
        image_blocks(corrupted, 0)
    # In range, negative layers and positions count from the end.
    neg = patch_residual(model, corrupted, clean, metric, layers=[-1], positions=[-1], progress=False)
    pos = patch_residual(model, corrupted, clean, metric, layers=[2], positions=[seq - 1], progress=False)
    assert_close(neg, pos, equal_nan=True)
    assert not torch.isnan(neg[2, seq - 1])
