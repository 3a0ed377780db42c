"""Head ablation against HF with the head's slice of the `o_proj` input replaced by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_no_hooks
from torch.testing import assert_close

from analyses.ablation import ablate_heads, head_ablation_scan, head_means, parse_heads
from analyses.plotting.flows import plot_head_scan

QUESTIONS = ["What is the color of the circle?", "Is the square red?"]


@pytest.fixture(scope="module")
def pair():
    """A 3-layer GQA model (4 heads, 2 KV heads) and its HF twin."""
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=5, n_layers=3)


@pytest.fixture(scope="module")
def padded(pair):
    from hooked_llava.testing import random_images

    return pair[0].prepare(images=random_images(2, seed=6), questions=QUESTIONS)


@pytest.fixture(scope="module")
def reference(pair):
    """Another batch for the means, of another length."""
    from hooked_llava.testing import random_images

    return pair[0].prepare(images=random_images(3, seed=7), questions=["Is the circle left?", "What?", "Which shape?"])


def hf_run(hf, inputs, edit):
    """HF logits with `edit(layer, o_proj_input)` applied to every layer's `o_proj` input."""
    handles = []
    for layer, block in enumerate(hf.model.language_model.layers):
        hook = lambda module, args, layer=layer: (edit(layer, args[0].clone()),)  # noqa: E731
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            return hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                      pixel_values=inputs.pixel_values).logits  # fmt: skip
    finally:
        for h in handles:
            h.remove()


def hf_o_proj_inputs(hf, inputs):
    """Every layer's `o_proj` input `[batch, pos, n_heads * d_head]` on `inputs`."""
    seen = {}

    def keep(layer, x):
        seen[layer] = x
        return x

    hf_run(hf, inputs, keep)
    return seen


def set_heads(x, heads, values, d_head):
    for h in heads:
        x[..., h * d_head : (h + 1) * d_head] = values[h]
    return x


def test_zero_ablation_matches_hf(pair, padded):
    model, hf = pair
    d = model.cfg.d_head
    heads = {0: [1], 2: [0, 3]}
    with torch.no_grad():
        ours = ablate_heads(model, padded, ["0_1", (2, 0), (2, 3)])
        base = model(padded)
    theirs = hf_run(hf, padded, lambda layer, x: set_heads(x, heads.get(layer, []), {h: 0.0 for h in range(4)}, d))
    real = padded.attention_mask.bool()
    assert_close(ours[real], theirs[real], atol=2e-5, rtol=1e-4)
    assert (ours - base)[real].abs().max() > 1e-3
    assert_no_hooks(model)


@pytest.mark.parametrize("per_position", [False, True])
def test_mean_ablation_matches_manual_means(pair, padded, reference, per_position):
    model, hf = pair
    d = model.cfg.d_head
    ref = padded if per_position else reference
    seen = hf_o_proj_inputs(hf, ref)
    w = ref.attention_mask.float()[:, :, None]  # real tokens only
    if per_position:
        means = {layer: (x * w).sum(0) / w.sum(0).clamp_min(1) for layer, x in seen.items()}  # [pos, h*d]
    else:
        means = {layer: (x * w).sum((0, 1)) / w.sum() for layer, x in seen.items()}  # [h*d]
    heads = {1: [2], 2: [1]}

    def edit(layer, x):
        m = means[layer]
        return set_heads(x, heads.get(layer, []), {h: m[..., h * d : (h + 1) * d] for h in range(4)}, d)

    theirs = hf_run(hf, padded, edit)
    with torch.no_grad():
        ours = ablate_heads(model, padded, ["1_2", "2_1"], method="mean", reference=ref, per_position=per_position)
    real = padded.attention_mask.bool()
    assert_close(ours[real], theirs[real], atol=2e-5, rtol=1e-4)
    mean_z = head_means(model, ref, [1], per_position)[1]
    assert_close(mean_z.flatten(-2).squeeze(0), means[1], atol=1e-6, rtol=1e-5)


def test_scan_equals_one_head_at_a_time(pair, padded, reference):
    model, _ = pair
    red = model.to_single_token("red")
    metric = lambda logits: logits[torch.arange(2), padded.last, red]  # noqa: E731  [batch]
    for method, ref in (("zero", None), ("mean", reference)):
        scan = head_ablation_scan(model, padded, metric, method=method, reference=ref, heads_per_batch=3,
                                  progress=False)  # fmt: skip
        assert scan.shape == (3, 4, 2)
        with torch.no_grad():
            loop = torch.stack([torch.stack([metric(ablate_heads(model, padded, (layer, h), method, ref))
                                             for h in range(4)]) for layer in range(3)])  # fmt: skip
        assert_close(scan, loop, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            assert (scan - metric(model(padded))).abs().max() > 1e-3
    assert head_ablation_scan(model, padded, lambda lg: lg[:, -1, red].mean(), progress=False).shape == (3, 4)
    with torch.no_grad():
        baseline = float(metric(model(padded)).mean())
    fig = plot_head_scan(scan.mean(-1), baseline=baseline)
    assert len(fig.axes) == 2  # the heatmap and its colour bar
    assert_no_hooks(model)


def test_parse_heads_and_errors(pair, padded):
    model, _ = pair
    assert parse_heads(["1_2", (0, 3), (1, 0)], 3, 4) == {1: [2, 0], 0: [3]}
    assert parse_heads((2, 1), 3, 4) == {2: [1]}
    with pytest.raises(ValueError, match="out of range"):
        parse_heads("3_0", 3, 4)
    with pytest.raises((ValueError, TypeError)):  # TypeError when the runtime type checker is on
        ablate_heads(model, padded, "0_0", method="resample")


def test_no_hooks_left_after_an_exception(pair, padded):
    model, _ = pair

    def bad_metric(logits):
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        head_ablation_scan(model, padded, bad_metric, progress=False)
    assert_no_hooks(model)

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.blocks[2].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            ablate_heads(model, padded, ["0_1", "2_2"], method="mean")
    finally:
        handle.remove()
    assert_no_hooks(model)


def test_shapes_model_head_scan():
    """On the trained Shapes model: zero-ablating heads moves the answer logit."""
    from hooked_llava.shapes import checkpoint_path

    if not checkpoint_path("shapes-llava").is_dir():
        pytest.skip("the shapes-llava checkpoint has not been built")
    from hooked_llava import HookedLlava
    from hooked_llava.shapes import ShapesWorld

    model = HookedLlava.from_pretrained("shapes-llava")
    example = ShapesWorld(0).example(0, "Colour")
    inputs = model.prepare(images=[example.image], prompts=[example.prompt])
    answer = model.to_single_token(example.answer)
    scan = head_ablation_scan(model, inputs, lambda lg: lg[0, -1, answer], progress=False)
    assert scan.shape == (model.cfg.n_layers, model.cfg.n_heads) and torch.isfinite(scan).all()


def test_bad_head_indices_name_the_valid_range(pair, padded):
    model, _ = pair
    with pytest.raises(IndexError, match=r"head '0_4': head 4 is out of range: valid heads are 0\.\.3"):
        ablate_heads(model, padded, "0_4")
    with pytest.raises(IndexError, match=r"head \(3, 0\): layer 3 is out of range: valid layers are 0\.\.2"):
        ablate_heads(model, padded, [(3, 0)])
    assert parse_heads([(-1, -1)], 3, 4) == {2: [3]}  # negative indices count from the end, within range
    with pytest.raises(ValueError, match=r"heads_per_batch must be in 1 or more, got 0"):
        head_ablation_scan(model, padded, lambda lg: lg[:, -1, 0].mean(), heads_per_batch=0, progress=False)


def test_ablation_keeps_no_autograd_graph(pair, padded):
    """An ablated forward is an analysis, not a training step: no graph is kept (on a 0.5B model with
    1,500 image tokens, one would hold every activation for a backward that never comes)."""
    model, _ = pair
    logits = ablate_heads(model, padded, ["0_1"], method="mean")
    assert torch.is_grad_enabled() and not logits.requires_grad and logits.grad_fn is None
