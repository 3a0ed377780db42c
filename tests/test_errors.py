"""Every bad input gets a message that says what was wrong and how to fix it."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from hooked_llava import UnsupportedConfigError
from hooked_llava.model.config import configs_from_hf
from hooked_llava.testing import random_images, tiny_llava_config


def test_placeholder_count_differs_from_image_features(tiny, batch):
    model, _ = tiny
    ids = batch.input_ids[:1, 1:]  # drop one token; keep the placeholders but cut the image short below
    ids = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError, match=r"15 image placeholder tokens.*16 features.*model.prepare"):
        model(ids, pixel_values=batch.pixel_values[:1])


def test_pixels_without_placeholders(tiny, batch):
    model, _ = tiny
    message = r"no token is the image placeholder id 4 \(the config's image_token_index\).*Put `<image>` in the prompt"
    with pytest.raises(ValueError, match=message):
        model(model.to_tokens("USER: What is it?"), pixel_values=batch.pixel_values[:1])


def test_placeholders_without_pixels(tiny, batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="no pixel_values were given"):
        model(batch.input_ids)


def test_prepare_with_more_placeholders_than_images(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="1 '<image>' placeholder.*0 image"):
        model.prepare(prompts=["USER: <image>\nWhat?\nASSISTANT:"])


@pytest.mark.parametrize(
    "pixels, message",
    [
        (torch.zeros(1, 3, 16, 16), r"shape \(1, 3, 16, 16\).*expects \[n_images, 3, 32, 32\]"),
        (torch.zeros(3, 32, 32), r"shape \(3, 32, 32\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "must be floating point"),
        ([[0.0]], "must be a tensor"),
    ],
)
def test_wrong_pixel_shape_or_dtype(tiny, batch, pixels, message):
    model, _ = tiny
    with pytest.raises((ValueError, TypeError), match=message):
        model(batch.input_ids[:1], pixel_values=pixels)


def test_sequence_over_the_context_length(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="exceeds the model's context length of 512"):
        model(torch.ones(1, 513, dtype=torch.long))


def test_empty_batch(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="empty batch"):
        model(torch.ones(0, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: setattr(c.text_config, "hidden_act", "mish"), "activation 'mish'"),
        (lambda c: setattr(c.vision_config, "hidden_act", "swish"), "vision tower uses the activation 'swish'"),
        (lambda c: setattr(c, "projector_hidden_act", "tanh"), "projector uses the activation 'tanh'"),
        (lambda c: c.__dict__.update(vision_feature_select_strategy="cls"), "select_strategy 'cls'"),
        (lambda c: setattr(c, "vision_feature_layer", -9), "vision_feature_layer -9 is out of range"),
        (lambda c: c.text_config.rope_parameters.update(rope_type="llama3"), "rope scaling type 'llama3'"),
    ],
)
def test_unsupported_config(edit, message):
    cfg = tiny_llava_config()
    edit(cfg)
    with pytest.raises(UnsupportedConfigError, match=message):
        configs_from_hf(cfg)


def test_attention_mask_shape_mismatch(tiny, batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask[:, 1:])


def test_unknown_role(batch):
    with pytest.raises(KeyError, match="unknown role 'answer'"):
        batch.mask("answer")


def test_related_role_needs_boxes(batch):
    with pytest.raises(ValueError, match="needs bounding boxes"):
        batch.mask("related")


def test_model_without_processor_says_how_to_prepare(tiny):
    from hooked_llava import HookedLlava

    _, hf = tiny
    bare = HookedLlava.from_hf(hf)
    with pytest.raises(ValueError, match="has no processor"):
        bare.prepare(images=random_images(1), prompts=["USER: <image>\nWhat?"])


# --- issue 12: odd runtime inputs -------------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_pixels_are_refused_before_the_forward(tiny, batch, value):
    model, _ = tiny
    pixels = batch.pixel_values.clone()
    pixels[1, 2, 5, 7] = value  # used to make every logit NaN
    inputs = model.prepare(input_ids=batch.input_ids, pixel_values=pixels, attention_mask=batch.attention_mask)
    with pytest.raises(ValueError, match=r"1 non-finite value\(s\) \(NaN or inf\), in image\(s\) \[1\]"):
        model(inputs)
    with pytest.raises(ValueError, match="non-finite"):
        model.generate(inputs, max_new_tokens=2)


def test_out_of_vocabulary_ids_are_named(tiny, batch):
    model, _ = tiny
    ids = batch.input_ids.clone()
    ids[0, -1], ids[1, -2] = model.cfg.d_vocab + 3, -1  # used to give "IndexError: index out of range in self"
    vocab = model.cfg.d_vocab
    message = rf"2 id\(s\) outside this model's vocabulary of {vocab} tokens \(valid: 0 to {vocab - 1}\): "
    message += rf"\[-1, {vocab + 3}\]"
    with pytest.raises(ValueError, match=message):
        model(ids, pixel_values=batch.pixel_values, attention_mask=batch.attention_mask)


def test_all_zero_attention_mask_row_is_refused(tiny, batch):
    model, _ = tiny
    mask = batch.attention_mask.clone()
    mask[1] = 0  # used to report a misleading "no <image> placeholder"
    with pytest.raises(ValueError, match=r"attention_mask row\(s\) \[1\] are all zeros"):
        model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=mask)
    twos = batch.attention_mask.clone()
    twos[0, -1] = 2  # would shift every later rotary position
    with pytest.raises(ValueError, match=r"only 0 \(padding\) and 1 \(real token\); got the values \[0, 1, 2\]"):
        model(batch.input_ids, pixel_values=batch.pixel_values, attention_mask=twos)


def test_wrong_image_token_index_says_which_id_was_looked_for(tiny, images):
    model, _ = tiny
    wrong = copy.deepcopy(model)
    inputs = model.prepare(images=images[:1], questions=["What?"])
    unused = next(i for i in range(model.cfg.d_vocab) if not (inputs.input_ids == i).any())
    wrong.cfg.image_token_id = unused
    message = rf"no token is the image placeholder id {unused} .*tokenizer maps to id 4.*probably wrong; set it to 4"
    with pytest.raises(ValueError, match=message):
        wrong(wrong.prepare(images=images[:1], questions=["What?"]))


# --- issue 12: images on other scales ---------------------------------------------------------------
def _gray8():
    return (np.arange(32 * 32).reshape(32, 32) * 7 % 256).astype(np.uint8)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: Image.fromarray(g.astype(np.uint16) * 257),  # PIL "I;16": used to saturate to white
        lambda g: Image.fromarray(g.astype(np.int32) * 257),  # PIL "I" with 16-bit values
        lambda g: Image.fromarray(g.astype(np.float32) / 255),  # PIL "F" in [0, 1]
    ],
    ids=["I;16", "I", "F"],
)
def test_16_bit_and_float_grayscale_images_match_their_8_bit_version(tiny, make):
    model, _ = tiny
    reference = model.prepare(images=[Image.fromarray(_gray8())], questions=["What?"]).pixel_values
    converted = model.prepare(images=[make(_gray8())], questions=["What?"]).pixel_values
    torch.testing.assert_close(converted, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: rgb.astype(np.float32) / 255,  # used to be rescaled twice (to almost black)
        lambda rgb: rgb.astype(np.float32),
        lambda rgb: rgb.astype(np.uint16) * 257,
        lambda rgb: torch.from_numpy(rgb).permute(2, 0, 1).float() / 255,
        lambda rgb: torch.from_numpy(rgb).permute(2, 0, 1).float(),
    ],
    ids=["numpy-0-1", "numpy-0-255", "numpy-uint16", "tensor-0-1", "tensor-0-255"],
)
def test_float_and_16_bit_arrays_are_rescaled_once(tiny, make):
    model, _ = tiny
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    reference = model.prepare(images=[Image.fromarray(rgb)], questions=["What?"]).pixel_values
    converted = model.prepare(images=[make(rgb)], questions=["What?"]).pixel_values
    torch.testing.assert_close(converted, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [-0.5, 300.0, float("nan")])
def test_float_images_outside_the_pixel_range_are_refused(tiny, bad):
    model, _ = tiny
    image = np.full((32, 32, 3), 0.5, dtype=np.float32)
    image[3, 4, 0] = bad
    with pytest.raises(ValueError, match=r"image 1 is a float image with values from .*pass it as pixel_values="):
        model.prepare(images=[np.full((32, 32, 3), 0.5, dtype=np.float32), image], prompts=["<image> <image> What?"])


# --- issue 12: hook return values -------------------------------------------------------------------
def _squash(x, hook):
    return x.mean(-1, keepdim=True)


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_pre", "blocks.1.hook_attn_out"])
def test_hook_returning_another_shape_is_refused(tiny, batch, name):
    model, _ = tiny
    b, n = batch.input_ids.shape
    message = rf"hook '_squash' on '{name}' returned \({b}, {n}, 1\) torch.float32, but its input is \({b}, {n}, 64\)"
    with pytest.raises(ValueError, match=message):  # used to broadcast to full-size logits
        model.run_with_hooks(batch, fwd_hooks=[(name, partial(_squash))])
    assert not any(hp.has_hooks() for hp in model.hook_dict.values())


@pytest.mark.parametrize(
    "hook, got",
    [(lambda x, hook: x.double(), r"torch.float64"), (lambda x, hook: [x], "a list")],
    ids=["dtype", "list"],
)
def test_hook_returning_another_dtype_or_type_is_refused(tiny, batch, hook, got):
    model, _ = tiny
    with pytest.raises(ValueError, match=rf"on 'blocks.1.attn.hook_z' returned .*{got}.*allow_broadcasting_hooks"):
        model.run_with_hooks(batch, fwd_hooks=[("blocks.1.attn.hook_z", hook)])


def test_deliberate_broadcasting_is_allowed_inside_the_context(tiny, batch):
    model, _ = tiny  # (hook_attn_out: the next typed function sees the broadcast sum, full size)
    expand = [("blocks.0.hook_attn_out", lambda x, hook: x.mean(-1, keepdim=True).expand_as(x).clone())]
    with torch.no_grad():
        reference = model.run_with_hooks(batch, fwd_hooks=expand)
        with model.allow_broadcasting_hooks():
            broadcast = model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_attn_out", _squash)])
    torch.testing.assert_close(broadcast, reference)
    with pytest.raises(ValueError, match="returned"):  # the opt-out ends with the block
        model.run_with_hooks(batch, fwd_hooks=[("blocks.0.hook_attn_out", _squash)])
