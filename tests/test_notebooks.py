"""The tutorial notebooks: 01-04 and 06 execute top to bottom on the shipped Shapes checkpoints; all are committed
clean.

Notebook 05 needs a GPU and the real LLaVA-1.5-7b weights, so it is only checked for being valid,
output-free and syntactically correct Python. Executing 01-04 needs nbclient, nbformat and ipykernel
(the "dev" extra) and the shipped checkpoints, and 06 also the "sae" extra; without them those tests are
skipped with the reason.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from hooked_llava.shapes import checkpoint_path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
EXECUTED = [
    "01_quickstart.ipynb",
    "02_study_a_shapes.ipynb",
    "03_study_b_shapes.ipynb",
    "04_patching_colour_swap.ipynb",
    "06_saes_shapes.ipynb",
]
NEEDS_SAE = {"06_saes_shapes.ipynb"}  # runs only where the sae extra (SAELens) is installed
ALL = [*EXECUTED, "05_real_llava_7b.ipynb"]
CELL_TIMEOUT_S = 300

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


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_valid_and_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [(i, cell) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    dirty = [i for i, cell in code if cell.outputs or cell.execution_count]
    assert not dirty, f"{name}: code cells {dirty} hold outputs; clear them before committing."
    to_python = _magics_to_python()
    for i, cell in code:
        try:
            ast.parse(to_python(cell.source))
        except SyntaxError as err:
            pytest.fail(f"{name}, cell {i}: {err}")


@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_executes(name):
    missing = _missing_checkpoints()
    if missing:
        pytest.skip(f"the shipped Shapes checkpoint(s) {missing} are missing from {checkpoint_path(missing[0]).parent}")
    install = "pip install -e '.[dev]'"
    if name in NEEDS_SAE:
        pytest.importorskip("sae_lens", reason="this notebook needs the sae extra: pip install -e '.[dev,sae]'")
    nbclient = pytest.importorskip("nbclient", reason=f"nbclient is needed to execute notebooks ({install})")
    pytest.importorskip("ipykernel", reason=f"ipykernel is needed to execute notebooks ({install})")
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the failing cell and its traceback, if any cell fails
    elapsed = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, f"{name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    findings = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.get("output_type") == "stream"
    )
    assert "Notebook run time" in findings, f"{name} did not reach its findings cell"
    print(f"{name} executed in {elapsed:.0f} s")
