"""The explorers of `analyses.viz`, driven in headless Chromium with selenium.

The numbers each view shows (read back from its DOM) are checked against the model's own hooks and
an independent logit lens and SAE encoding; every page is checked for console errors and for any
request that is not a `file:` or `data:` URL. The size test builds a LLaVA-1.5-7B-shaped payload
from a fake pattern tensor. Browser tests skip where selenium, Chromium or chromedriver is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hooked_llava.shapes import ShapesWorld, checkpoint_path

pytestmark = pytest.mark.skipif(
    not checkpoint_path("shapes-llava").is_dir(), reason="the Shapes checkpoints are not shipped"
)
TOL = 2e-3
EXTERNAL = re.compile(
    r"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import""", re.I
)


@pytest.fixture(scope="module")
def model():
    from hooked_llava import HookedLlava

    return HookedLlava.from_pretrained("shapes-llava")


@pytest.fixture(scope="module")
def example():
    return ShapesWorld(seed=0).example(0, "Colour")


@pytest.fixture(scope="module")
def inputs(model, example):
    return model.prepare(images=[example.image], questions=[example.question])


@pytest.fixture(scope="module")
def cache(model, inputs):
    with torch.no_grad():
        return model.run_with_cache(inputs)[1]


def open_page(driver, path: Path) -> None:
    """Load a page and wait until every explorer on it has drawn (call `assert_clean` after using it)."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser"), driver.get_log("performance")  # drop what earlier pages logged
    driver.get(path.as_uri())
    script = "return [...document.querySelectorAll('.hlv-root')].map(r => r.getAttribute('data-ready'))"
    WebDriverWait(driver, 60).until(lambda d: (s := d.execute_script(script)) and all(x in ("1", "error") for x in s))
    assert set(driver.execute_script(script)) == {"1"}, driver.execute_script("return document.body.innerText")


def assert_clean(driver) -> None:
    """No console error since the page was opened, and every request it made was a local file or a data: URL."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    urls += driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls, "the network log recorded nothing (not even the page itself)"
    assert all(u.startswith(("file:", "data:", "blob:")) for u in urls), urls


def values(driver, attribute: str = "data-value", scope: str = "") -> dict[str, str]:
    """`data-testid` → attribute for every node under `scope` that carries the attribute."""
    script = (
        "return Object.fromEntries([...document.querySelectorAll(arguments[0])]"
        ".map(n => [n.getAttribute('data-testid'), n.getAttribute(arguments[1])]))"
    )
    return driver.execute_script(script, f"{scope} [{attribute}]".strip(), attribute)


def choose(driver, testid: str, value: str, scope: str = "") -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.CSS_SELECTOR, f"{scope} [data-testid='{testid}']")).select_by_value(value)


def click(driver, testid: str, scope: str = "") -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"{scope} [data-testid='{testid}']").click()


def patch_positions(inputs) -> dict[str, int]:
    rc, image = inputs.patch_rc()[0], inputs.image_mask[0]
    return {f"patch-{r}-{c}": p for p, (r, c) in enumerate(rc.tolist()) if image[p]}


def assert_shown(shown: dict[str, str], expected: dict[str, float]) -> None:
    assert set(expected) <= set(shown), sorted(set(expected) - set(shown))[:5]
    diff = max(abs(float(shown[k]) - v) for k, v in expected.items())
    assert diff <= TOL, f"largest difference {diff:.2e}"


# ---- attention ---------------------------------------------------------------------------------


def test_attention_explorer_shows_the_models_pattern(model, inputs, cache, driver, tmp_path):
    from analyses.viz import attention_explorer

    view = attention_explorer(model, inputs)
    open_page(driver, view.save(tmp_path / "attention.html"))
    last, cells = int(inputs.last[0]), patch_positions(inputs)
    pattern = cache["blocks.3.attn.hook_pattern"][0]  # [head, query, key]
    choose(driver, "layer-select", "3")
    choose(driver, "head-select", "1")
    click(driver, f"token-{last}")
    shown = values(driver)
    assert_shown(shown, {cell: float(pattern[1, last, p]) for cell, p in cells.items()})
    text = [p for p in range(inputs.input_ids.shape[1]) if not inputs.image_mask[0, p]]
    assert_shown(shown, {f"token-{p}": float(pattern[1, last, p]) for p in text})

    hover_and_scale(driver, shown, list(cells))

    other = int(inputs.positions("question")[0][-1])  # the question's "?"
    click(driver, f"token-{other}")
    moved = values(driver)
    assert max(abs(float(moved[c]) - float(shown[c])) for c in cells) > 10 * TOL
    assert_shown(moved, {cell: float(pattern[1, other, p]) for cell, p in cells.items()})

    choose(driver, "head-select", "mean")
    assert_shown(values(driver), {cell: float(pattern[:, other, p].mean()) for cell, p in cells.items()})
    click(driver, "patch-2-3")  # what attends to patch (2, 3): every text query's weight on it
    key = cells["patch-2-3"]
    assert_shown(values(driver), {f"token-{q}": float(pattern[:, q, key].mean()) for q in text})
    assert_clean(driver)


def hover_and_scale(driver, shown: dict[str, str], cells: list[str]) -> None:
    """Hovering a patch shows its exact value; the image's colour scale runs from 0 to the largest patch value."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    find = lambda testid: driver.find_element(By.CSS_SELECTOR, f"[data-testid='{testid}']")  # noqa: E731
    ActionChains(driver).move_to_element(find("patch-4-6")).perform()
    assert find("hover-info").text.endswith(shown["patch-4-6"])
    assert float(find("scale-image-min").text) == 0
    assert abs(float(find("scale-image-max").text) - max(float(shown[c]) for c in cells)) < 1e-9


def test_attention_explorer_on_the_vision_tower(model, inputs, cache, driver, tmp_path):
    from analyses.viz import attention_explorer

    view = attention_explorer(model, inputs, tower="vision", layers=[0, 2])
    open_page(driver, view.save(tmp_path / "vision.html"))
    pattern = cache["vision.blocks.2.attn.hook_pattern"][0]  # [head, 65, 65]: CLS, then the 8 x 8 patches
    grid = model.vision.cfg.image_size // model.vision.cfg.patch_size
    cls = pattern.shape[-1] - grid * grid
    cells = {f"patch-{r}-{c}": cls + r * grid + c for r in range(grid) for c in range(grid)}
    choose(driver, "layer-select", "1")  # the second layer offered: layer 2
    choose(driver, "head-select", "2")
    choose(driver, "patch-mode", "query")
    click(driver, "patch-5-1")  # where patch (5, 1) looks
    assert_shown(values(driver), {c: float(pattern[2, cells["patch-5-1"], p]) for c, p in cells.items()})
    choose(driver, "patch-mode", "key")
    click(driver, "patch-5-1")  # what attends to it
    assert_shown(values(driver), {c: float(pattern[2, p, cells["patch-5-1"]]) for c, p in cells.items()})
    click(driver, "token-0")  # CLS as the query
    assert_shown(values(driver), {c: float(pattern[2, 0, p]) for c, p in cells.items()})
    assert_clean(driver)


def test_attention_explorer_reads_a_given_cache_and_refuses_bad_options(model, inputs, cache):
    from analyses.viz import attention_explorer, decode_array

    view = attention_explorer(model, inputs, cache=cache, layers=[5], queries=[int(inputs.last[0])])
    shown = decode_array(view.payload["attention"])  # [layer, 1 + head, query, key]
    expected = cache["blocks.5.attn.hook_pattern"][0, :, int(inputs.last[0])]
    assert np.abs(shown[0, 1:, 0] - expected.numpy()).max() <= 2 / 65535
    with pytest.raises(ValueError, match="tower must be"):
        attention_explorer(model, inputs, tower="audio")
    with pytest.raises(ValueError, match="layers 0..7"):
        attention_explorer(model, inputs, layers=[8])
    with pytest.raises(ValueError, match="not real positions"):
        attention_explorer(model, inputs, queries=[999])


# ---- logit lens ----------------------------------------------------------------------------------


def test_patch_lens_explorer_shows_the_logit_lens_top_tokens(model, inputs, cache, driver, tmp_path):
    from analyses import logit_lens
    from analyses.viz import patch_lens_explorer

    view = patch_lens_explorer(model, inputs)
    open_page(driver, view.save(tmp_path / "lens.html"))
    cells = patch_positions(inputs)
    order = list(cells)
    lens = logit_lens(model, inputs, positions=[cells[c] for c in order])  # [layer, 1, cell, vocab]
    n = model.cfg.n_layers
    for layer in (2, n):
        choose(driver, "layer-select", str(layer))
        shown, probs = values(driver, "data-top-token"), values(driver, "data-prob")
        ids = lens[layer, 0].argmax(-1).tolist()
        assert {c: shown[c] for c in order} == dict(zip(order, model.tokenizer.batch_decode([[i] for i in ids])))
        top = lens[layer, 0].softmax(-1).max(-1).values
        assert_shown(probs, dict(zip(order, top.tolist())))
        # independently: the residual stream read through the final norm and the unembedding by hand
        resid = cache[f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"]
        by_hand = (model.ln_final(resid) @ model.W_U + model.b_U)[0].argmax(-1)
        assert [by_hand[cells[c]].item() for c in order] == ids
    assert_clean(driver)


# ---- SAE features ----------------------------------------------------------------------------------


class TopKEncoder(torch.nn.Module):
    """The shipped TopK SAE's encoder, written out here (no SAELens): keep the k largest pre-activations."""

    def __init__(self, k: int = 16):
        super().__init__()
        from safetensors.torch import load_file

        weights = load_file(checkpoint_path("shapes-llava-sae") / "sae_weights.safetensors")
        self.W_enc, self.b_enc, self.b_dec = (torch.nn.Parameter(weights[n]) for n in ("W_enc", "b_enc", "b_dec"))
        self.k = k

    def encode(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


def test_feature_explorer_shows_the_encoders_activations_and_labels(model, driver, tmp_path):
    from analyses.viz import feature_explorer

    world = ShapesWorld(seed=1)
    scenes = [world.example(i, "Colour") for i in range(4)]
    encoder, hook = TopKEncoder(), "blocks.4.hook_resid_post"
    view = feature_explorer(model, encoder, scenes, hook=hook, n_features=4)
    open_page(driver, view.save(tmp_path / "features.html"))
    inputs = model.prepare(images=[s.image for s in scenes], prompts=[s.prompt for s in scenes])
    with torch.no_grad():
        latents = encoder.encode(model.run_with_cache(inputs, names_filter=[hook])[1][hook])
    features = view.payload["features"]
    assert len(features) == 4 and all(latents[..., f].max() > 0 for f in features)
    for i in (0, 3):
        choose(driver, "feature-select", str(i))
        f = features[i]
        for s in range(len(scenes)):
            one = inputs[[s]]
            expected = {cell: float(latents[s, p, f]) for cell, p in patch_positions(one).items()}
            text = one.attention_mask[0].bool() & ~one.image_mask[0]
            expected |= {f"token-{p}": float(latents[s, p, f]) for p in text.nonzero()[:, 0].tolist()}
            assert_shown(values(driver, scope=f"[data-testid='scene-{s}']"), expected)
        label = driver.execute_script("return document.querySelector(\"[data-testid='feature-label']\").dataset")
        check_label(world, scenes, inputs, latents[..., f], label.get("attribute"), view.payload["labels"][i])
    assert_clean(driver)


def check_label(world, scenes, inputs, acts, attribute, label) -> None:
    """The label's precision and recall, recomputed by hand from the scenes' object patches."""
    from analyses.patch_maps import to_grid
    from hooked_llava.shapes.scene import horizontal_word

    fires = (to_grid(inputs, acts).flatten(1) > 0).numpy()  # [scene, cell]
    if not fires.any():
        assert label is None and attribute == ""
        return
    kind, _, value = attribute.partition("=")
    truth = np.zeros_like(fires)
    for s, example in enumerate(scenes):
        for obj, cells in zip(example.scene.objects, world.object_patches(example.scene)):
            side = horizontal_word(obj.center[0], world.image_size)
            if kind == "object" or {"color": obj.color, "shape": obj.shape, "side": side}.get(kind) == value:
                truth[s, cells] = True
    hits = (fires & truth).sum()
    assert label["attribute"] == attribute
    assert abs(label["precision"] - hits / fires.sum()) < 1e-6 and abs(label["recall"] - hits / truth.sum()) < 1e-6


def test_feature_explorer_finds_the_hook_or_says_to_give_it(model):
    from analyses.viz import feature_explorer

    scenes = [ShapesWorld(seed=1).example(0, "Colour")]
    encoder = TopKEncoder()
    with pytest.raises(ValueError, match="hook="):
        feature_explorer(model, encoder, scenes)
    encoder.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name="blocks.4.hook_resid_post"))  # as SAELens names it
    assert feature_explorer(model, encoder, scenes, features=7).payload["hook"] == "blocks.4.hook_resid_post"
    with pytest.raises(ValueError, match="no hook"):
        feature_explorer(model, encoder, scenes, hook="blocks.99.hook_resid_post")
    with pytest.raises(IndexError, match="0..1023"):
        feature_explorer(model, encoder, scenes, features=[5000])


def test_feature_explorer_takes_a_saelens_sae(model):
    sae_lens = pytest.importorskip("sae_lens")
    from analyses.viz import feature_explorer

    sae = sae_lens.SAE.load_from_disk(checkpoint_path("shapes-llava-sae"))
    scenes = [ShapesWorld(seed=1).example(i, "Colour") for i in range(2)]
    view = feature_explorer(model, sae, scenes, n_features=2)
    inputs = model.prepare(images=[s.image for s in scenes], prompts=[s.prompt for s in scenes])
    with torch.no_grad():
        acts = sae.encode(model.run_with_cache(inputs, names_filter=[view.payload["hook"]])[1][view.payload["hook"]])
    assert view.payload["features"] == acts[inputs.image_mask].amax(0).topk(2).indices.tolist()


# ---- the explain report ----------------------------------------------------------------------------

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"


def test_the_explain_report_embeds_working_explorers(model, inputs, cache, driver, tmp_path):
    from analyses import logit_lens
    from analyses.report.explain import explain, write_html

    report = explain(model, inputs, say=lambda msg: None, model_name="shapes-llava")
    page = write_html(report, tmp_path)
    assert {p.stem for p in tmp_path.glob("*.png")} >= {"patches_tool", "patches_attention"}  # the PNGs stay
    assert not EXTERNAL.search(page.read_text())
    open_page(driver, page)
    attention, lens = "[data-testid='explorer-attention']", "[data-testid='explorer-lens']"
    last, cells = int(inputs.last[0]), patch_positions(inputs)
    choose(driver, "layer-select", "3", attention)
    choose(driver, "head-select", "1", attention)
    click(driver, f"token-{last}", attention)
    pattern = cache["blocks.3.attn.hook_pattern"][0, 1, last]
    assert_shown(values(driver, scope=attention), {c: float(pattern[p]) for c, p in cells.items()})
    choose(driver, "layer-select", "4", lens)
    order = list(cells)
    top = logit_lens(model, inputs, positions=[cells[c] for c in order], layers=[4])[0, 0].argmax(-1)
    shown = values(driver, "data-top-token", lens)
    assert [shown[c] for c in order] == model.tokenizer.batch_decode([[i] for i in top.tolist()])
    assert_clean(driver)
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    driver.find_element(By.CSS_SELECTOR, "#explorer-patches").screenshot(str(ARTIFACTS / "explorer.png"))
    assert (ARTIFACTS / "explorer.png").stat().st_size > 10_000


def test_notebook_01_shows_a_working_attention_explorer(driver, tmp_path):
    """The committed, executed quickstart holds an explorer that draws in a browser (as in VS Code or Jupyter)."""
    import nbformat

    notebook = nbformat.read(Path(__file__).resolve().parents[1] / "notebooks" / "01_quickstart.ipynb", as_version=4)
    shown = [
        out["data"]["text/html"]
        for cell in notebook.cells
        for out in cell.get("outputs", [])
        if "hlv-root" in out.get("data", {}).get("text/html", "")
    ]
    assert len(shown) == 1 and 'data-kind="attention"' in shown[0]
    page = tmp_path / "notebook_output.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body>{shown[0]}</body></html>")
    open_page(driver, page)
    assert len(values(driver)) > 64  # every patch and text token shows a value
    assert_clean(driver)


# ---- what the pages load and weigh -----------------------------------------------------------------


def test_pages_load_nothing_from_outside_and_stay_small(model, inputs):
    from analyses.viz import attention_explorer, feature_explorer, page_assets, patch_lens_explorer

    scenes = [ShapesWorld(seed=1).example(i, "Colour") for i in range(6)]
    views = [
        attention_explorer(model, inputs),
        attention_explorer(model, inputs, tower="vision"),
        patch_lens_explorer(model, inputs),
        feature_explorer(model, TopKEncoder(), scenes, hook="blocks.4.hook_resid_post"),
    ]
    for view in views:
        page = view.to_html()
        assert not EXTERNAL.search(page), EXTERNAL.search(page)
        assert view.nbytes() < 2_000_000, (view.kind, view.nbytes())
        assert page_assets() in view._repr_html_() and page_assets() in page
    assert "http" not in page_assets()


def test_a_7b_sized_attention_view_weighs_what_the_docstring_says():
    """LLaVA-1.5-7B: 576 image tokens in about 620 positions, 45 text queries, 32 layers x 32 heads."""
    from analyses.viz import build_attention_view, decode_array

    n_layer, n_head, n_key, grid = 32, 32, 620, 24
    image_at = range(35, 35 + grid * grid)
    queries = [p for p in range(n_key) if p not in image_at][-45:]
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n_layer, n_head, len(queries), n_key, generator=gen) * 2
    logits[..., 0] += 6  # an attention sink on BOS, as in the real model
    causal = torch.arange(n_key)[None, :] > torch.tensor(queries)[:, None]
    patterns = logits.masked_fill(causal, float("-inf")).softmax(-1)
    tokens = [f"<img {(p - 35) // grid},{(p - 35) % grid}>" if p in image_at else "tok" for p in range(n_key)]
    cells = [((p - 35) // grid, (p - 35) % grid) if p in image_at else (-1, -1) for p in range(n_key)]
    view = build_attention_view(patterns, tokens, cells, queries, np.zeros((336, 336, 3)), grid, list(range(n_layer)))
    data = view.payload["attention"]
    assert data["bits"] == 8 and data["shape"] == [n_layer, n_head + 1, len(queries), n_key]
    weight = view.nbytes()
    bound = 4 / 3 * n_layer * (n_head + 1) * len(queries) * n_key + 200_000  # base64 of incompressible codes
    assert weight < bound < 40e6
    assert weight < 8e6, weight  # the docstring: about 6 MB with a sink
    back = decode_array(data)[3, 1:, :, :]  # one layer read back: 8-bit rounding of the square root only
    assert np.abs(np.sqrt(back) - patterns[3].sqrt().numpy()).max() <= 1 / 510 + 1e-6
    one_layer = build_attention_view(patterns[:1], tokens, cells, queries, np.zeros((336, 336, 3)), grid, [0])
    assert one_layer.nbytes() < 1e6
