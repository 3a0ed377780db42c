"""Attention knockout against a plain HF forward with hand-built 4D masks, and the batched sweep
against running every configuration on its own."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from conftest import assert_no_hooks
from torch.testing import assert_close

from analyses.information_flow.attention_knockout import knockout, knockout_sweep
from analyses.information_flow.flows import flow_mask, resolve_flows, window_layers
from analyses.information_flow.stats import summarize_knockout, t_quantile
from analyses.plotting.flows import plot_knockout

QUESTIONS = ["What is the color of the circle?", "Is the square red?"]
BOXES = [[(0, 0, 12, 12)], [(8, 16, 30, 31)]]


@pytest.fixture(scope="module")
def deep():
    """A 12-layer model (enough for a full 9-layer window) and its HF twin."""
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=3, n_layers=12, d_model=32)


@pytest.fixture(scope="module")
def padded(deep):
    """Two prompts of different lengths (left padding), with a box per prompt."""
    from hooked_llava.testing import random_images

    model, _ = deep
    return model.prepare(images=random_images(2, seed=4), questions=QUESTIONS, boxes=BOXES)


def col(series):
    return torch.tensor(series.to_numpy(), dtype=torch.float64)


def hf_knockout(hf, inputs, target, source, layers):
    """Logits of HF's forward where each layer in `layers` gets the mask causal & not-pad & not
    (target query, source key), as a 4D additive float mask with finfo.min."""
    ids, mask2d = inputs.input_ids, inputs.attention_mask.bool()
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask2d[:, None, :]
    allowed &= ~(target[:, :, None] & source[:, None, :])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    def swap_mask(module, args, kwargs):
        return args, {**kwargs, "attention_mask": additive}

    attn = [hf.model.language_model.layers[layer].self_attn for layer in layers]
    handles = [a.register_forward_pre_hook(swap_mask, with_kwargs=True) for a in attn]
    try:
        with torch.no_grad():
            position_ids = (inputs.attention_mask.cumsum(-1) - 1).clamp(min=0)
            out = hf(input_ids=ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
                     position_ids=position_ids)  # fmt: skip
    finally:
        for h in handles:
            h.remove()
    return out.logits


def independent_sets(inputs, image_token_id):
    image = inputs.input_ids == image_token_id
    last = torch.zeros_like(image)
    last[:, -1] = True  # left padding: every row ends at the last column
    return image, last


def test_knockout_matches_hf_with_padding(deep, padded):
    model, hf = deep
    image, last = independent_sets(padded, hf.config.image_token_id)
    real = padded.attention_mask.bool()
    with torch.no_grad():
        ours = knockout(model, padded, "image", "last", layers=[0, 1, 2, 5])
        base = model(padded)
    theirs = hf_knockout(hf, padded, last, image, [0, 1, 2, 5])
    assert_close(ours[real], theirs[real], atol=2e-5, rtol=1e-4)
    assert (ours - base)[real].abs().max() > 1e-3  # the knockout does something
    assert_no_hooks(model)


def test_knockout_explicit_positions_and_single_prompt(deep, padded):
    """Explicit position lists (also covering padding positions) and an unpadded single prompt."""
    model, hf = deep
    image, _ = independent_sets(padded, hf.config.image_token_id)
    n = padded.input_ids.shape[1]
    targets = [n - 6, n - 3, n - 1]
    target = torch.zeros_like(image)
    target[:, targets] = True
    source = torch.zeros_like(image)
    source[:, : n - 6] = True  # includes row 1's padding and text before the image
    real = padded.attention_mask.bool()
    with torch.no_grad():
        ours = knockout(model, padded, list(range(n - 6)), targets, layers=range(3, 9))
    assert_close(ours[real], hf_knockout(hf, padded, target, source, range(3, 9))[real], atol=2e-5, rtol=1e-4)
    single = padded[0]
    image1, last1 = independent_sets(single, hf.config.image_token_id)
    with torch.no_grad():
        ours1 = knockout(model, single, "image", "last", layers=7)
    assert_close(ours1, hf_knockout(hf, single, last1, image1, [7]), atol=2e-5, rtol=1e-4)


def test_window_layers_clip_at_the_ends():
    assert list(window_layers(0, 12)) == [0, 1, 2, 3, 4]
    assert list(window_layers(5, 12)) == list(range(1, 10))
    assert list(window_layers(11, 12)) == [7, 8, 9, 10, 11]
    assert list(window_layers(3, 12, window=3)) == [2, 3, 4]


def test_even_windows_are_placed_as_in_the_study_code():
    """Study B's code blocks range(max(0, l - w//2), min(L, l - (-w//2))): w//2 layers before l,
    w//2 - 1 after for an even w. Hand-computed for L = 12."""
    assert list(window_layers(5, 12, window=4)) == [3, 4, 5, 6]  # l-2 .. l+1, not l-1 .. l+2
    assert list(window_layers(5, 12, window=2)) == [4, 5]
    assert list(window_layers(0, 12, window=4)) == [0, 1]
    assert list(window_layers(11, 12, window=4)) == [9, 10, 11]
    assert list(window_layers(5, 12, window=1)) == [5]
    assert list(window_layers(-1, 12, window=3)) == [10, 11]  # -1 is the last layer
    with pytest.raises(ValueError, match=r"window must be in 1 or more, got 0"):
        window_layers(5, 12, window=0)
    with pytest.raises(IndexError, match=r"layer 12 is out of range: valid layers are 0\.\.11"):
        window_layers(12, 12)


def test_sweep_equals_separate_configurations(deep, padded):
    model, _ = deep
    # "image->text" has target queries from position 0 on (nothing to reuse before them).
    flows = ["image->question", "related->question", ("question", "last"), "image->text"]
    df = knockout_sweep(model, padded, flows, window=9, batch_size=7, progress=False)
    assert list(df.columns) == ["flow", "layer", "example", "p_base", "p_blocked", "rel_change", "delta_log_prob"]
    assert len(df) == 4 * 12 * 2
    rows = torch.arange(2)
    with torch.no_grad():
        base = model(padded)[rows, padded.last].softmax(-1)
    answer = base.argmax(-1)
    expected = []
    for label, (source, target) in resolve_flows(flows).items():
        for layer in range(12):
            with torch.no_grad():
                logits = knockout(model, padded, source, target, window_layers(layer, 12, 9))
            p = logits[rows, padded.last].softmax(-1)[rows, answer]
            expected += [(label, layer, e, float(base[e, answer[e]]), float(p[e])) for e in range(2)]
    want = pd.DataFrame(expected, columns=["flow", "layer", "example", "p_base", "p_blocked"])
    assert df[["flow", "layer", "example"]].equals(want[["flow", "layer", "example"]])
    assert_close(col(df.p_base), col(want.p_base), atol=1e-7, rtol=1e-5)
    assert_close(col(df.p_blocked), col(want.p_blocked), atol=1e-7, rtol=1e-5)
    assert_close(col(df.rel_change), col((want.p_blocked - want.p_base) / want.p_base * 100), atol=1e-4, rtol=1e-4)
    assert df.rel_change.abs().max() > 0.1  # the knockouts change something
    assert_no_hooks(model)


def test_sweep_answer_option_and_row_order(deep, padded):
    """A given answer per example, and examples split across base passes (batch_size=1)."""
    model, _ = deep
    tokens = ["red", "blue"]
    df = knockout_sweep(model, padded, "Image→Last", answer=tokens, batch_size=1, progress=False)
    ids = torch.tensor([model.to_single_token(t) for t in tokens])
    with torch.no_grad():
        p0 = model(padded)[torch.arange(2), padded.last].softmax(-1)[torch.arange(2), ids]
        p5 = knockout(model, padded[1], "image", "last", window_layers(5, 12))[0, -1].softmax(-1)[ids[1]]
    assert set(df.flow) == {"image->last"}
    assert_close(col(df[df.layer == 0].p_base), p0.double(), atol=1e-7, rtol=1e-5)
    row = df[(df.layer == 5) & (df.example == 1)]
    assert_close(col(row.p_blocked), p5[None].double(), atol=1e-7, rtol=1e-5)


def test_resolve_flows_and_row_selection(padded):
    flows = resolve_flows(["Other → Question", ("image", [3, 4])])
    assert flows == {"other->question": ("other_image", "question"), "image->[3, 4]": ("image", [3, 4])}
    assert resolve_flows("text->last") == {"text->last": ("text", "last")}
    assert len(resolve_flows(None)) == 6
    with pytest.raises(ValueError, match="unknown flow"):
        resolve_flows(["image"])
    picked = padded[[1, 0, 1]]
    assert torch.equal(picked.input_ids, padded.input_ids[[1, 0, 1]])
    assert torch.equal(picked.pixel_values, padded.pixel_values[[1, 0, 1]])
    assert picked.boxes == [BOXES[1], BOXES[0], BOXES[1]]
    assert torch.equal(picked.mask("related"), padded.mask("related")[[1, 0, 1]])


def test_summary_confidence_interval():
    values = [1.0, 2.0, 4.0, 8.0, 10.0]
    df = pd.DataFrame({"flow": "a->b", "layer": 0, "example": range(5), "rel_change": values})
    out = summarize_knockout(pd.concat([df, df.assign(layer=1, rel_change=0.0)]))
    mean = sum(values) / 5
    sem = math.sqrt(sum((v - mean) ** 2 for v in values) / 4 / 5)
    row = out[out.layer == 0].iloc[0]
    assert row["n"] == 5 and row["mean"] == pytest.approx(mean)
    assert row["ci_high"] - mean == pytest.approx(2.7764451052 * sem, rel=1e-3)  # t(0.975, df=4)
    assert out[out.layer == 1].iloc[0][["ci_low", "ci_high"]].tolist() == [0.0, 0.0]
    assert t_quantile(0.975, 1) == pytest.approx(12.7062047362)
    assert t_quantile(0.975, 2) == pytest.approx(4.3026527297)
    assert t_quantile(0.975, 30) == pytest.approx(2.0422724563, rel=1e-6)
    fig = plot_knockout(out)
    assert len(fig.axes[0].lines) == 1 + 1  # the flow and the zero line
    with pytest.raises(ValueError, match="summarize_knockout"):
        plot_knockout(df)


def test_no_hooks_left_after_an_exception(deep, padded):
    model, _ = deep

    def boom(module, args, output):
        raise RuntimeError("boom")

    handle = model.blocks[6].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            knockout(model, padded, "image", "last", layers=[5, 6])
        assert_no_hooks(model)
        with pytest.raises(RuntimeError, match="boom"):
            knockout_sweep(model, padded, ["image->last"], progress=False)
        assert_no_hooks(model)
    finally:
        handle.remove()


def test_shapes_model_sweep():
    """On the trained Shapes model: a sweep runs and the Image→Last knockout is reported."""
    from hooked_llava.shapes import checkpoint_path

    if not checkpoint_path("shapes-llava").is_dir():
        pytest.skip("the shapes-llava checkpoint has not been built")
    from hooked_llava import HookedLlava
    from hooked_llava.shapes import ShapesWorld

    model = HookedLlava.from_pretrained("shapes-llava")
    examples = [ShapesWorld(0).example(i, "ChooseAttr") for i in range(2)]
    inputs = model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples],
                           boxes=[list(e.related_bboxes) for e in examples])  # fmt: skip
    df = knockout_sweep(model, inputs, ["image->last", "related->question"], progress=False)
    assert len(df) == 2 * model.cfg.n_layers * 2 and df.p_blocked.notna().all()
    assert (df.p_base > 0).all()


def test_delta_log_prob_matches_hf_hand_masks(deep, padded):
    """`delta_log_prob` = log p_blocked − log p_base, against HF runs with hand-built masks, in float64."""
    model, hf = deep
    image, last = independent_sets(padded, hf.config.image_token_id)
    df = knockout_sweep(model, padded, "image->last", window=4, progress=False)
    with torch.no_grad():
        base = hf(input_ids=padded.input_ids, attention_mask=padded.attention_mask, pixel_values=padded.pixel_values,
                  position_ids=(padded.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].double()  # fmt: skip
    answer = base.argmax(-1)
    for layer in (0, 5, 11):
        blocked = hf_knockout(hf, padded, last, image, range(max(0, layer - 2), min(12, layer + 2)))[:, -1].double()
        want = blocked.log_softmax(-1)[torch.arange(2), answer] - base.log_softmax(-1)[torch.arange(2), answer]
        got = col(df[df.layer == layer].sort_values("example").delta_log_prob)
        assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert df.delta_log_prob.abs().max() > 1e-3  # the knockouts change something
    # The same change in nats as the relative change, where both are well resolved.
    assert_close(col(df.delta_log_prob), torch.log1p(col(df.rel_change) / 100), atol=1e-5, rtol=1e-4)


def test_pil_box_rule_is_one_pixel_wider(deep, padded):
    """box_rule="pil" equals the default rule on boxes widened by one pixel by hand."""
    from hooked_llava.inputs.geometry import box_to_patches
    from hooked_llava.testing import random_images

    # 48x64 image, crop 32: resized to 32x42, 5 columns cut on the left; x = 19 * 42/64 - 5 = 7.47 < 8.
    assert box_to_patches((12, 0, 19, 8), (48, 64), (32, 32), 8) == {(0, 0)}
    assert box_to_patches((12, 0, 19, 8), (48, 64), (32, 32), 8, box_rule="pil") == {(0, 0), (0, 1)}
    model, _ = deep
    boxes = [[(0, 0, 8, 8)], [(8, 16, 16, 24), (0, 0, 3, 3)]]  # on the 8-pixel patch edges of a 32x32 image
    inputs = model.prepare(images=random_images(2, seed=4), questions=QUESTIONS, boxes=boxes)
    wider = [[(x0, y0, x1 + 1, y1 + 1) for x0, y0, x1, y1 in row] for row in boxes]
    by_hand = model.prepare(images=random_images(2, seed=4), questions=QUESTIONS, boxes=wider).mask("related")
    assert torch.equal(flow_mask(inputs, "related", box_rule="pil"), by_hand)
    assert by_hand.sum(1).tolist() == [4, 4 + 1] and inputs.mask("related").sum(1).tolist() == [1, 1 + 1]
    assert torch.equal(flow_mask(inputs, "other", box_rule="pil"), inputs.image_mask & ~by_hand)
    pil = knockout_sweep(model, inputs, "related->question", box_rule="pil", progress=False)
    explicit = knockout_sweep(model, inputs, {"related->question": (by_hand, "question")}, progress=False)
    assert_close(col(pil.p_blocked), col(explicit.p_blocked), atol=0, rtol=0)


def test_bad_indices_name_the_valid_range(deep, padded):
    model, _ = deep
    n = padded.input_ids.shape[1]
    with pytest.raises(IndexError, match=rf"position 1000 is out of range: the sequence has positions 0\.\.{n - 1}"):
        knockout(model, padded, [1000], "last", layers=[0])
    with pytest.raises(IndexError, match=rf"position -{n + 1} is out of range"):
        knockout(model, padded, "image", [-(n + 1)], layers=[0])
    with pytest.raises(IndexError, match=r"layer 12 is out of range: valid layers are 0\.\.11 \(or -12\.\.-1"):
        knockout(model, padded, "image", "last", layers=[12])
    with pytest.raises(IndexError, match=r"layer -13 is out of range"):
        knockout(model, padded, "image", "last", layers=-13)
    with torch.no_grad():  # in range, negative layers and positions count from the end
        assert_close(knockout(model, padded, "image", [-1], layers=[-1]), knockout(model, padded, "image", "last", 11))
    with pytest.raises(ValueError, match=r"window must be in 1 or more, got 0"):
        knockout_sweep(model, padded, "image->last", window=0, progress=False)
    with pytest.raises(ValueError, match=r"batch_size must be in 1 or more, got 0"):
        knockout_sweep(model, padded, "image->last", batch_size=0, progress=False)
    with pytest.raises(
        IndexError, match=rf"token id {10**6} is out of range: the vocabulary has ids 0\.\.{model.cfg.d_vocab - 1}"
    ):
        knockout_sweep(model, padded, "image->last", answer=10**6, progress=False)
    with pytest.raises(IndexError, match=rf"position {n} is out of range"):
        knockout_sweep(model, padded, {"x": ([n], "last")}, progress=False)
