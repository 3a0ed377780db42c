"""Every bad input gets a message that says what was wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch

from hooked_llava import UnsupportedConfigError
from hooked_llava.config import configs_from_hf
from hooked_llava.testing import random_images, tiny_llava_config


def test_placeholder_count_differs_from_image_features(tiny, batch):
    model, _ = tiny
    ids = batch.input_ids[:1, 1:]  # drop one token; keep the placeholders but cut the image short below
    ids = torch.cat([ids[:, :3], ids[:, 4:]], dim=1)  # one placeholder fewer
    with pytest.raises(ValueError, match=r"15 image placeholder tokens.*16 features.*model.prepare"):
        model(ids, pixel_values=batch.pixel_values[:1])


def test_pixels_without_placeholders(tiny, batch):
    model, _ = tiny
    with pytest.raises(ValueError, match="no `<image>` placeholder.*Put `<image>` in the prompt"):
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
