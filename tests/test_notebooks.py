"""The tutorial notebooks: 01-04, 06 and 07 are committed executed, with outputs and figures, and still
execute; 05 (GPU) and 08 (LLaVA-OneVision-0.5B's weights) are committed clean, and 08 is executed here on
a tiny OneVision checkpoint and without any weights.

A reader on GitHub sees 01-04's results, so the committed copies must be complete runs: every code cell
executed once, in order, no error output, a figure wherever a cell plots, no progress-bar flood, the
findings cell reached, and small files. `python notebooks/execute.py` re-executes them in place.
Notebook 05 needs a GPU and the real LLaVA-1.5-7b weights, so it is only checked for being valid,
output-free and syntactically correct Python. Executing 01-04 needs nbclient, nbformat and ipykernel
(the "dev" extra) and the shipped checkpoints, and 06 also the "sae" extra; without them those tests are
skipped with the reason.
"""

from __future__ import annotations

import ast
import os
import re
import time
from pathlib import Path

import pytest

from hooked_llava.shapes import checkpoint_path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
EXECUTED = [
    "01_quickstart.ipynb",
    "02_study_a_shapes.ipynb",
    "03_study_b_shapes.ipynb",
    "04_patching_colour_swap.ipynb",
    "06_saes_shapes.ipynb",
    "07_attribution_graphs.ipynb",
]
NEEDS_SAE = {"06_saes_shapes.ipynb"}  # runs only where the sae extra (SAELens) is installed
UNEXECUTED = ["05_real_llava_7b.ipynb", "08_onevision_laptop.ipynb"]  # need a GPU or weights we cannot ship
LAPTOP = "08_onevision_laptop.ipynb"
ALL = [*EXECUTED, *UNEXECUTED]
CELL_TIMEOUT_S = 300
MAX_TOTAL_BYTES = 2_500_000  # all six notebooks together, figures included
PLOTS = re.compile(r"\bFigure\(|\bplot_\w+\(")  # a cell that draws a figure
PROGRESS_BAR = re.compile(r"\d+/\d+ \[|it/s\]|s/it\]")  # tqdm's "12/680 [00:01<00:50, 13.2it/s]"

nbformat = pytest.importorskip("nbformat", reason="nbformat is needed to read the notebooks (pip install -e '.[dev]')")


def _missing_checkpoints() -> list[str]:
    return [name for name in ("shapes-llava", "shapes-lm") if not checkpoint_path(name).is_dir()]


def _magics_to_python():
    """IPython's cell transformer (`%matplotlib inline` → `get_ipython().run_line_magic(...)`), if installed."""
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # without IPython, check the cells with their magic lines dropped
        return lambda source: "\n".join(line for line in source.splitlines() if not line.startswith("%"))
    return TransformerManager().transform_cell


def _read(name: str):
    return nbformat.read(NOTEBOOKS_DIR / name, as_version=4)


def _code_cells(nb) -> list[tuple[int, object]]:
    return [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for _, c in _code_cells(nb) for o in c.outputs if o.output_type == "stream")


def _run_problems(name: str, nb) -> list[str]:
    """What makes `nb` not a complete, readable run: a list of sentences (empty when it is one)."""
    problems = []
    code = _code_cells(nb)
    counts = [cell.execution_count for _, cell in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts {counts}: run every cell once, top to bottom, in a fresh kernel")
    for i, cell in code:
        errors = [o for o in cell.outputs if o.output_type == "error"]
        if errors:
            problems.append(f"cell {i} holds an error output ({errors[0].ename}: {errors[0].evalue})")
        images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        if PLOTS.search(cell.source) and not images:
            problems.append(f"cell {i} draws a figure but holds no image output")
        bars = [o for o in cell.outputs if o.output_type == "stream" and PROGRESS_BAR.search(o.text)]
        if bars:
            problems.append(f"cell {i} holds a progress bar in its output: pass progress=False or set TQDM_DISABLE")
    if "Notebook run time" not in _stream_text(nb):
        problems.append("the findings cell's output ('Notebook run time ...') is missing")
    return [f"{name}: {p}" for p in problems]


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_valid_python(name):
    nb = _read(name)
    nbformat.validate(nb)
    to_python = _magics_to_python()
    for i, cell in _code_cells(nb):
        try:
            ast.parse(to_python(cell.source))
        except SyntaxError as err:
            pytest.fail(f"{name}, cell {i}: {err}")


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_is_committed_executed(name):
    problems = _run_problems(name, _read(name))
    assert not problems, "\n".join(problems) + "\nRe-execute it with `python notebooks/execute.py`."


@pytest.mark.parametrize("name", UNEXECUTED)
def test_gpu_notebook_is_committed_clean(name):
    dirty = [i for i, cell in _code_cells(_read(name)) if cell.outputs or cell.execution_count]
    assert not dirty, f"{name}: code cells {dirty} hold outputs; it needs a GPU or real weights, so commit it clean."


def test_committed_notebooks_are_small():
    sizes = {name: (NOTEBOOKS_DIR / name).stat().st_size for name in ALL}
    assert sum(sizes.values()) < MAX_TOTAL_BYTES, f"notebooks take {sizes} bytes; lower the figures' size or dpi"


def test_run_problems_catches_an_incomplete_run():
    """The committed-run check itself: a notebook cleared, out of order, failing or flooded is refused."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("display(Figure())"), nbformat.v4.new_code_cell("run()")]
    assert len(_run_problems("x", nb)) == 3  # never executed, a plot without a figure, no findings
    nb.cells[0].execution_count, nb.cells[1].execution_count = 2, 1
    bar = nbformat.v4.new_output("stream", name="stderr", text=" 1%|          | 5/680 [00:00<00:50, 13.28it/s]")
    error = nbformat.v4.new_output("error", ename="ValueError", evalue="bad", traceback=[])
    nb.cells[1].outputs = [bar, error, nbformat.v4.new_output("stream", name="stdout", text="Notebook run time: 3 s.")]
    problems = " | ".join(_run_problems("x", nb))
    for expected in ("execution counts [2, 1]", "cell 0 draws a figure", "cell 1 holds an error", "progress bar"):
        assert expected in problems
    assert "findings" not in problems


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_executes(name, monkeypatch):
    missing = _missing_checkpoints()
    if missing:
        pytest.skip(f"the shipped Shapes checkpoint(s) {missing} are missing from {checkpoint_path(missing[0]).parent}")
    if name in NEEDS_SAE:
        pytest.importorskip("sae_lens", reason="this notebook needs the sae extra: pip install -e '.[dev,sae]'")
    start = time.perf_counter()
    nb = _execute(name, monkeypatch)  # in memory: the committed file is left as it is
    elapsed = time.perf_counter() - start
    problems = _run_problems(name, nb)
    assert not problems, "\n".join(problems)
    print(f"{name} executed in {elapsed:.0f} s")


def _execute(name: str, monkeypatch, **env: str):
    """Execute a copy of a notebook with extra environment variables; the executed copy. A failing cell
    raises CellExecutionError with its traceback."""
    install = "pip install -e '.[dev]'"
    nbclient = pytest.importorskip("nbclient", reason=f"nbclient is needed to execute notebooks ({install})")
    pytest.importorskip("ipykernel", reason=f"ipykernel is needed to execute notebooks ({install})")
    # The kernel runs in notebooks/: put this checkout first on its path, not an installed copy.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = _read(name)
    resources = {"metadata": {"path": str(NOTEBOOKS_DIR)}}
    nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources=resources).execute()
    return nb


def test_laptop_notebook_runs_every_analysis_on_a_local_onevision_folder(monkeypatch, tmp_path):
    """Notebook 08 with `HOOKED_LLAVA_ONEVISION` set to a saved tiny OneVision: every cell runs, draws its
    figures and reports the answer the model gives, computed here independently."""
    import torch
    from PIL import Image

    from hooked_llava import HookedLlava
    from hooked_llava.shapes.world import ShapesWorld
    from hooked_llava.testing_onevision import tiny_pair

    torch.manual_seed(0)
    model, hf = tiny_pair("onevision", seed=3)
    hf.save_pretrained(tmp_path)
    model.processor.save_pretrained(tmp_path)
    nb = _execute(LAPTOP, monkeypatch, HOOKED_LLAVA_ONEVISION=str(tmp_path), TQDM_DISABLE="1")
    problems = [p for p in _run_problems(LAPTOP, nb) if "progress bar" not in p]
    assert not problems, "\n".join(problems)

    model = HookedLlava.from_pretrained(tmp_path)
    scene = next(s for s in map(ShapesWorld(seed=0).scene, range(1000)) if len(s.objects) == 2)
    question = f"What is the color of the {scene.objects[0].shape}? Answer with one word."
    inputs = model.prepare(questions=[question], images=[[scene.image.resize((384, 384), Image.NEAREST)]])
    with torch.no_grad():
        probs = model(inputs)[0, -1].float().softmax(-1)
    said = _stream_text(nb)
    assert f"the model answers {model.to_string([int(probs.argmax())])!r} (p = {float(probs.max()):.3f})" in said
    assert "Skipped" not in said and "- Knockout's largest drops" in said


def test_laptop_notebook_skips_cleanly_without_weights(monkeypatch, tmp_path):
    """Without the weights (nothing in the Hugging Face cache, no network), notebook 08 says what to download
    and every later cell runs without error and without output."""
    nb = _execute(LAPTOP, monkeypatch, HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")
    said = _stream_text(nb)
    assert "Skipped: the weights of llava-hf/llava-onevision-qwen2-0.5b-ov-hf are not on this machine" in said
    assert "hf download llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in said and "Notebook run time" in said
    code = _code_cells(nb)
    skip = next(k for k, (_, cell) in enumerate(code) if "Skipped:" in "".join(o.get("text", "") for o in cell.outputs))
    outputs = [o for _, cell in code[skip + 1 :] for o in cell.outputs]
    assert all(o.output_type == "stream" for o in outputs), "a cell after the skip shows a table, figure or error"
    lines = "".join(o.text for o in outputs).splitlines()
    assert all(line.startswith(("scene:", "question:", "truth:", "Notebook run time")) for line in lines), lines
