"""Loading LLaVA-OneVision and LLaVA-Interleave from saved HF folders (both key layouts, with their
Qwen2-style tokenizer and processor), and the clear errors for what stays unsupported."""

from __future__ import annotations

import json

import pytest
import torch

from hooked_llava import HookedLlava
from hooked_llava.testing import random_images
from hooked_llava.testing_onevision import tiny_pair

ATOL = 1e-4
# transformers ≥5 in-memory names for the on-disk prefixes save_pretrained writes
RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("image_newline", "model.image_newline"),
)


@pytest.fixture(scope="module", params=["onevision", "interleave"])
def saved(request, tmp_path_factory):
    model, hf = tiny_pair(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder)
    model.processor.save_pretrained(folder)
    return request.param, folder, model


def _renamed(folder, out):
    from safetensors.torch import load_file, save_file

    out.mkdir()
    for name in folder.iterdir():
        if name.suffix != ".safetensors":
            (out / name.name).write_bytes(name.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        new = next((n + key[len(o) :] for o, n in RENAMES if key.startswith(o)), key)
        renamed[new] = value
    assert any(k.startswith("model.language_model.") for k in renamed)
    save_file(renamed, out / "model.safetensors")
    return out


def _inputs(kind, model):
    images = random_images(3, 44, seed=7)
    if kind == "onevision":
        return model.prepare(questions=["What is the color?", "Which one?"], images=[[images[0]], images[1:]])
    return model.prepare(questions=["What is the color?"], images=[images[:2]])


@pytest.mark.parametrize("layout", ["on_disk", "transformers_5"])
def test_saved_folder_loads_with_its_processor_and_matches(saved, layout, tmp_path):
    kind, folder, reference = saved
    path = folder if layout == "on_disk" else _renamed(folder, tmp_path / "renamed")
    model = HookedLlava.from_pretrained(path)
    assert hasattr(model.processor, "image_processor"), type(model.processor)
    assert model.cfg.original_architecture == reference.cfg.original_architecture
    inputs = _inputs(kind, model)
    assert inputs.texts[0].startswith("<|im_start|>user\n<image>\n")
    real = inputs.attention_mask.bool()
    with torch.no_grad():
        diff = (model(inputs) - reference(inputs))[real].abs().max().item()
    assert diff <= ATOL, diff


def _edited(saved, tmp_path, **changes):
    _, folder, _ = saved
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    for name in folder.iterdir():
        (out / name.name).write_bytes(name.read_bytes())
    config = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        part, _, field = key.partition("__")
        (config[part] if field else config)[field or part] = value
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_unsupported_configs_are_refused_clearly(saved, tmp_path):
    kind, _, model = saved
    if kind == "onevision":
        with pytest.raises(Exception, match="anyres_max_N"):
            HookedLlava.from_pretrained(_edited(saved, tmp_path, vision_aspect_ratio="anyres"))
        with pytest.raises(Exception, match="needs vision_feature_select_strategy 'full'"):
            HookedLlava.from_pretrained(_edited(saved, tmp_path / "b", vision_feature_select_strategy="default"))
        with pytest.raises(ValueError, match="need the same number of frames"):
            model.prepare(questions=["a", "b"], videos=[random_images(2, 32), random_images(3, 32)])
    else:
        with pytest.raises(ValueError, match="only LLaVA-OneVision models take videos"):
            model.prepare(questions=["What is shown?"], videos=[random_images(2, 32)])
