"""Shared fixtures: tiny random LLaVA models built from configs, never at import time."""

from __future__ import annotations

import warnings

import pytest
import torch
from jaxtyping import install_import_hook

# Runtime shape checking of every jaxtyping annotation in the packages under test.
install_import_hook(["hooked_llava", "analyses"], "beartype.beartype")

warnings.filterwarnings("ignore", message=".*torchvision.*")

PROMPTS = [
    "USER: <image>\nWhat is the color of the circle?\nASSISTANT:",
    "USER: <image>\nIs the square red or blue?\nASSISTANT:",
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and timings stay steady on the 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """`(HookedLlava, HF LlavaForConditionalGeneration)` with the same random weights (GQA, layer -2)."""
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def images():
    from hooked_llava.testing import random_images

    return random_images(2, size=32, seed=1)


@pytest.fixture(scope="module")
def batch(tiny, images):
    """Two prompts of different lengths with two different images (left padded)."""
    model, _ = tiny
    return model.prepare(images=images, prompts=PROMPTS)
