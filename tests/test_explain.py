"""`hooked-llava explain`: the report's numbers, the default scene's acceptance numbers, and the
page checked in headless Chromium."""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from analyses.report import explain as explain_module
from analyses.report.explain import explain, write_html
from analyses.report.patches import object_rank
from hooked_llava.cli.arguments import DEFAULT_SCENE, build_inputs, load_model, scene
from hooked_llava.testing import random_images

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
FIGURES = ["logit_lens_prob", "logit_lens_rank", "head_scores", "patches_tool", "patches_attention", "knockout"]
CHECK = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const id of %s) {
    const s = document.getElementById(id);
    out.push(id + ':' + (s && s.innerText.trim().length > 0 ? 'ok' : 'missing'));
  }
  for (const img of document.querySelectorAll('img:not(.hlv-root img)'))  // explorers are checked in test_viz
    out.push(img.alt.replace(/ /g, '_') + ':' + (img.naturalWidth > 50 && img.naturalHeight > 50 ? 'ok' : 'empty'));
  const cells = [...document.querySelectorAll('td')].map(td => td.innerText.trim());
  out.push('nan_cells:' + cells.filter(c => /^(nan|NaN|inf|-inf)$/.test(c) || c === '').length);
  const head = document.querySelector('header').innerText;
  out.push('header:' + encodeURIComponent(head));
  const div = document.createElement('div'); div.id = 'check'; div.textContent = out.join(' ');
  document.body.appendChild(div);
});
</script>"""
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def tiny_report(tiny):
    model, _ = tiny
    inputs = model.prepare(images=random_images(1), questions=["What is the color of the circle?"])
    return inputs, explain(model, inputs, say=lambda msg: None)


@pytest.fixture(scope="module")
def shapes_model():
    return load_model("shapes-llava")


@pytest.fixture(scope="module")
def default_report(shapes_model, tmp_path_factory):
    example = scene(DEFAULT_SCENE)
    inputs = build_inputs(shapes_model, argparse.Namespace(), example, None)
    report = explain(shapes_model, inputs, say=lambda msg: None, model_name="shapes-llava")
    out = tmp_path_factory.mktemp("report")
    write_html(report, out)
    return example, inputs, report, out


def test_tiny_report_numbers_match_independent_computations(tiny_report, tiny):
    inputs, report = tiny_report
    model, _ = tiny
    with torch.no_grad():
        probs = model(inputs)[0, inputs.last[0]].double().softmax(-1)
    assert report.answer_id == int(probs.argmax())
    assert report.probability == pytest.approx(float(probs.max()), abs=1e-6)
    assert report.tables["answer"]["rank"].tolist() == [1, 2, 3, 4, 5]
    heads = report.tables["top_heads"]
    assert heads["rank"].tolist() == list(range(1, 11)) and "batch" not in heads
    sweep = report.tables["knockout_sweep"]
    expected = [math.log(b) - math.log(a) for a, b in zip(sweep.p_base, sweep.p_blocked, strict=True)]
    # delta_log_prob comes from log-softmax; the logs of the float32 probabilities agree to their rounding
    assert sweep.delta_log_prob.tolist() == pytest.approx(expected, abs=1e-6)
    assert set(sweep.flow) == set(explain_module.FLOWS) and sweep.layer.nunique() == model.cfg.n_layers
    lens = report.tables["logit_lens"]
    final = lens[(lens.layer == model.cfg.n_layers) & (lens.token_id == report.answer_id)]
    assert final["rank"].tolist() == [1] and final["prob"].iloc[0] == pytest.approx(report.probability, abs=1e-5)


def test_tiny_report_files(tiny_report, tmp_path):
    _, report = tiny_report
    write_html(report, tmp_path)
    assert sorted(p.stem for p in tmp_path.glob("*.png")) == sorted(FIGURES)
    assert all(p.stat().st_size > 1000 for p in tmp_path.glob("*.png"))
    assert (tmp_path / "knockout_sweep.csv").read_text().startswith("flow,layer,example")
    page = (tmp_path / "report.html").read_text().lower()
    assert "<td>nan</td>" not in page and "<td>inf</td>" not in page


def test_patch_map_below_the_noise_floor_is_said_not_drawn(tiny, monkeypatch):
    model, _ = tiny
    for dtype in (torch.float32, torch.float64):
        monkeypatch.setitem(explain_module.NOISE_FLOOR, dtype, 1e9)
    inputs = model.prepare(images=random_images(1), questions=["What is the color of the circle?"])
    report = explain(model, inputs, say=lambda msg: None)
    assert "patches_tool" not in report.figures and "patches_attention" in report.figures
    assert "below the 1e+09-nat resolution" in report.notes["patches"] and "not drawn" in report.notes["patches"]
    assert "embedding" not in report.tables and "Left out" in report.notes["embedding"]


def test_default_scene_is_informative(default_report):
    example, inputs, report, _ = default_report
    assert len(example.scene.objects) >= 2 and report.answer == example.answer
    assert 0.5 < report.probability < 0.99
    assert report.tables["knockout_sweep"].delta_log_prob.abs().max() > 0.1
    assert object_rank(inputs, report.maps["log_prob_increase"]) <= 3
    assert report.tables["embedding"]["on a named object"].iloc[0] == "yes"


def test_question_about_the_cross_on_the_default_scene(shapes_model):
    example = scene(DEFAULT_SCENE)
    args = argparse.Namespace(question="What is the color of the cross?", prompt=None)
    inputs = build_inputs(shapes_model, args, example, None)
    with torch.no_grad():
        answer = int(shapes_model(inputs)[0, inputs.last[0]].argmax())
    assert shapes_model.tokenizer.decode([answer]) == example.scene.find("cross").color


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (CI installs it: apt-get install chromium)")
def test_default_report_in_chromium(default_report, tmp_path):
    example, _, report, out = default_report
    page = (out / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK % list(report.sections) + "</body>"))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [_chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = run("--dump-dom", checked.as_uri()).stdout
    verdicts = dict(item.rsplit(":", 1) for item in dom.split('<div id="check">')[1].split("</div>")[0].split())
    from urllib.parse import unquote

    header = unquote(verdicts.pop("header"))
    assert "shapes-llava" in header and example.question in header and report.answer in header
    assert verdicts.pop("nan_cells") == "0"
    assert set(verdicts) == set(report.sections) | set(FIGURES) | {"input_image"}
    assert all(v == "ok" for v in verdicts.values()), verdicts
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "explain_report.png"
    run("--window-size=1200,3600", f"--screenshot={shot}", (out / "report.html").as_uri())
    assert shot.stat().st_size > 10_000
