"""`prepare` and the roles of positions in `LlavaInputs`."""

from __future__ import annotations

import torch
from conftest import PROMPTS

from hooked_llava.geometry import box_to_patches
from hooked_llava.testing import random_images

STUDY_B = (
    "A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
    "Is the circle red or blue? \nAnswer the question using a single word or phrase. ASSISTANT:"
)


def _words(model, inputs, row, role):
    return model.to_str_tokens(inputs.input_ids[row][inputs.mask(role)[row]])


def test_roles_of_a_padded_batch(tiny, batch):
    model, _ = tiny
    assert _words(model, batch, 0, "question") == ["What", "is", "the", "color", "of", "the", "circle", "?"]
    assert _words(model, batch, 1, "question") == ["Is", "the", "square", "red", "or", "blue", "?"]
    assert batch.mask("image").sum(1).tolist() == [16, 16]
    assert batch.last.tolist() == [batch.shape[1] - 1] * 2  # left padding
    assert batch.mask("pad")[1].sum() == 1 and not batch.mask("pad")[0].any()
    text, template = batch.mask("text"), batch.mask("template")
    assert torch.equal(text, batch.mask("question") | template)
    assert _words(model, batch, 0, "template") == ["<s>", "USER", ":", "ASSISTANT", ":"]


def test_right_padding_puts_last_at_each_rows_end(tiny, images):
    model, _ = tiny
    inputs = model.prepare(images=images, prompts=PROMPTS, padding_side="right")
    lengths = inputs.attention_mask.sum(1)
    assert inputs.last.tolist() == (lengths - 1).tolist()
    assert inputs.mask("last").sum().item() == 2


def test_patch_grid_positions_are_row_major(batch):
    rc = batch.patch_rc()
    image = batch.mask("image")
    rows = rc[0][image[0]]
    expected = torch.tensor([(r, c) for r in range(4) for c in range(4)])
    assert torch.equal(rows, expected)
    assert (rc[~image] == -1).all()
    assert batch.image_index()[image].tolist() == [0] * 16 + [1] * 16


def test_questions_argument_and_study_b_prompt(tiny, images):
    model, _ = tiny
    a = model.prepare(images=images[:1], questions=["Is the circle red or blue?"])
    assert _words(model, a, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]
    b = model.prepare(images=images[:1], prompts=[STUDY_B])
    assert _words(model, b, 0, "question") == ["Is", "the", "circle", "red", "or", "blue", "?"]


def test_explicit_positions_and_row_selection(batch):
    assert batch.as_mask([0, 2]).sum(1).tolist() == [2, 2]
    assert [p.tolist() for p in batch.positions([3])] == [[3], [3]]
    one = batch[1]
    assert one.input_ids.shape == (1, batch.shape[1]) and one.pixel_values.shape[0] == 1
    assert torch.equal(one.pixel_values[0], batch.pixel_values[1])


def test_related_patches_follow_the_box_through_resize_and_crop(tiny):
    model, _ = tiny
    # a 64×48 (w×h) image is resized to 42×32 then centre-cropped to 32×32, 5 px off the left:
    # x 12..20 → 3.0..8.3 touches columns 0 and 1; x 12..19 → 3.0..7.7 only column 0
    assert box_to_patches((12, 0, 20, 8), (48, 64), (32, 32), 8) == {(0, 0), (0, 1)}
    assert box_to_patches((12, 0, 19, 8), (48, 64), (32, 32), 8) == {(0, 0)}
    image = random_images(1, size=32)[0].resize((64, 48))
    inputs = model.prepare(images=[image], prompts=PROMPTS[:1], boxes=[[(12, 0, 19, 8), (40, 40, 64, 48)]])
    related = inputs.patch_rc()[inputs.mask("related")].tolist()
    assert sorted(map(tuple, related)) == [(0, 0), (3, 2), (3, 3)]
    assert inputs.mask("other_image").sum() == 16 - 3


def test_hf_style_call_equals_inputs_call(tiny, batch):
    model, _ = tiny
    with torch.no_grad():
        a = model(batch)
        b = model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)
        _, cache = model.run_with_cache(
            batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask
        )
    assert torch.equal(a, b)
    assert "blocks.0.attn.hook_pattern" in cache
