"""Write the student version of every course notebook: `python notebooks/course/make_student_version.py [OUT_DIR]`.

Each exercise's `# SOLUTION` … `# END SOLUTION` region becomes `raise NotImplementedError()`, and outputs
are cleared (see `hooked_llava.course.student`). The default output folder is `notebooks/course/student/`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # this checkout's hooked_llava, installed or not
from hooked_llava.course.student import student_notebook  # noqa: E402


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(HERE.glob("[0-9]*.ipynb")):
        nbformat.write(student_notebook(nbformat.read(path, as_version=4)), out_dir / path.name)
        print(f"wrote {out_dir / path.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "student")
