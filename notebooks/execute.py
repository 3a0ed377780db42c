"""Re-execute the tutorial notebooks 01-04, 06 and 07 in place, so that the committed copies show their outputs.

Run it from anywhere in the repository (it needs the "dev" extra: nbclient, nbformat, ipykernel):

    python notebooks/execute.py                       # 01-04, 06 and 07 (06 needs the "sae" extra)
    python notebooks/execute.py 02_study_a_shapes     # only the named ones

Each notebook runs top to bottom in a fresh kernel whose working directory is notebooks/ and whose
PYTHONPATH starts with the repository root, so it imports this checkout's `hooked_llava` and `analyses`.
A failing cell stops the run with its traceback and leaves that notebook's file unchanged. Notebook 05
(the real LLaVA-1.5-7b) needs a GPU and the downloaded weights: it is committed unexecuted and never run here.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbclient
import nbformat

NOTEBOOKS = Path(__file__).resolve().parent
ROOT = NOTEBOOKS.parent
EXECUTED = [
    "01_quickstart",
    "02_study_a_shapes",
    "03_study_b_shapes",
    "04_patching_colour_swap",
    "06_saes_shapes",
    "07_attribution_graphs",
]
CELL_TIMEOUT_S = 600


def execute(name: str) -> float:
    """Execute notebooks/`name`.ipynb in place; return the seconds it took."""
    path = NOTEBOOKS / f"{name.removesuffix('.ipynb')}.ipynb"
    if not path.is_file():
        raise SystemExit(f"no notebook {path}; choose from {EXECUTED}")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,  # no per-cell timestamps: re-runs differ only where the results do
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (with the cell and its traceback) on a failing cell
    nbformat.write(nb, path)
    return time.perf_counter() - start


def main(names: list[str]) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    for name in names or EXECUTED:
        seconds = execute(name)
        size = (NOTEBOOKS / f"{name.removesuffix('.ipynb')}.ipynb").stat().st_size
        print(f"{name}: executed in {seconds:.0f} s, {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main(sys.argv[1:])
