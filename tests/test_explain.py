"""`hooked-llava explain`: the report has every section and figure, checked in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from analyses.explain import SECTIONS, explain, write_html
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
  for (const img of document.images)
    out.push(img.alt + ':' + (img.naturalWidth > 50 && img.naturalHeight > 50 ? 'ok' : 'empty'));
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
def report_dir(tiny, tmp_path_factory):
    model, _ = tiny
    inputs = model.prepare(images=random_images(1), questions=["What is the color of the circle?"])
    report = explain(model, inputs, say=lambda msg: None)
    out = tmp_path_factory.mktemp("report")
    write_html(report, out)
    return out, report


def test_report_files_and_numbers(report_dir, tiny):
    out, report = report_dir
    model, _ = tiny
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(FIGURES)
    assert all(p.stat().st_size > 1000 for p in out.glob("*.png"))
    assert 0 < report.probability <= 1 and report.answer
    assert len(report.tables["top_heads"]) == 10
    assert set(report.tables["knockout"].flow) == {"question->last", "image->last", "image->question", "last->last"}
    assert report.tables["knockout"].layer.nunique() == model.cfg.n_layers
    assert len(report.tables["embedding"]) == 5


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (CI installs it: apt-get install chromium)")
def test_report_renders_every_section_and_figure_in_chromium(report_dir, tmp_path):
    out, _ = report_dir
    page = (out / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK % list(SECTIONS) + "</body>"))
    run = lambda *extra: subprocess.run(  # noqa: E731
        [_chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *extra],
        capture_output=True,
        text=True,
        timeout=120,
    )
    dom = run("--dump-dom", checked.as_uri()).stdout
    verdicts = dict(item.rsplit(":", 1) for item in dom.split('<div id="check">')[1].split("</div>")[0].split())
    assert set(verdicts) == set(SECTIONS) | set(FIGURES)
    assert all(v == "ok" for v in verdicts.values()), verdicts
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "explain_report.png"
    run("--window-size=1200,3200", f"--screenshot={shot}", (out / "report.html").as_uri())
    assert shot.stat().st_size > 10_000
