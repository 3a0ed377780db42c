"""Shared fixtures: tiny random LLaVA models built from configs (never at import time), and a headless browser."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

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
# A long and a short prompt: the short one is left padded.
SHORT_PROMPTS = [
    "USER: <image>\nWhat is the color of the circle?\nASSISTANT:",
    "USER: <image>\nIs it red?\nASSISTANT:",
]


# Texts for the TransformerLens tokenizer and generate tests: a long and a short one.
TEXTS = ["USER: What is the color of the circle?", "USER: Is it?"]


def ids_by_hand(model, text, bos=True):
    """Independent tokenisation: the tokenizer without special tokens, BOS put in by hand."""
    tok = model.tokenizer
    return ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]


def weights_folder(saved, path, files, index=None):
    """`path` with `saved`'s config.json and the given safetensors files (name -> tensors), and the
    index `index` (key -> file name) if given: checkpoint folders for the loading tests."""
    import json
    import shutil

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(saved / "config.json", path / "config.json")
    for name, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, path / name)
    if index is not None:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return path


def logits_of(model, batch):
    with torch.no_grad():
        return model(batch)


def assert_no_hooks(model):
    """No hook point of `model` holds a forward or backward hook: a pure analysis leaves none behind."""
    for name, hp in model.hook_dict.items():
        assert not hp.has_hooks(), name
        assert not hp._forward_hooks and not hp._backward_hooks and not hp.fwd_hooks, name


def random_norm_twin(seed):
    """`(HookedLlava, HF twin, inputs)`: a tiny model whose RMSNorm weights are random (so a forgotten
    norm weight shows), built from HF weights drawn with `seed`, and `SHORT_PROMPTS` over two images
    drawn with `seed + 1`."""
    from hooked_llava import HookedLlava
    from hooked_llava.testing import random_images, tiny_hf_llava, tiny_processor

    hf = tiny_hf_llava(seed=seed, random_norms=True)
    model = HookedLlava.from_hf(hf, tiny_processor())
    return model, hf, model.prepare(images=random_images(2, seed=seed + 1), prompts=SHORT_PROMPTS)


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


@pytest.fixture(autouse=True)
def _threads_kept_at_one():
    """A test that runs a command which sets its own thread count (training, evaluation) must not
    change the numerics of later tests: float sums depend on the number of threads."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    """`(HookedLlava, HF LlavaForConditionalGeneration)` with the same random weights (GQA, layer -2)."""
    from hooked_llava.testing import tiny_model

    return tiny_model(seed=0)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """The `tiny` model saved by HF: an index and several shards, with its processor."""
    model, hf = tiny
    path = tmp_path_factory.mktemp("llava")
    hf.save_pretrained(path, max_shard_size="20KB")
    model.processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images():
    from hooked_llava.testing import random_images

    return random_images(2, size=32, seed=1)


@pytest.fixture(scope="module")
def batch(tiny, images):
    """Two prompts of different lengths with two different images (left padded)."""
    model, _ = tiny
    return model.prepare(images=images, prompts=PROMPTS)


@pytest.fixture(scope="module")
def state(saved):
    """The saved tiny checkpoint's tensors, by name."""
    from hooked_llava.loading.pretrained import read_checkpoint

    return dict(read_checkpoint(saved))


@pytest.fixture(scope="module")
def shapes_llava():
    """The trained `shapes-llava` checkpoint; the test is skipped while it is not built."""
    from hooked_llava import HookedLlava
    from hooked_llava.shapes import checkpoint_path

    if not checkpoint_path("shapes-llava").is_dir():
        pytest.skip("the shapes-llava checkpoint is not built yet")

    return HookedLlava.from_pretrained("shapes-llava")


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium driven by selenium (skips without selenium, Chromium or chromedriver)."""
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()
