"""Turn the course's solution notebooks into student versions.

In a solution notebook every exercise body sits between a `# SOLUTION` line and an `# END SOLUTION`
line. The student version replaces each such region by `raise NotImplementedError()` at the same
indentation (with the exercise's docstring and signature kept) and clears every output.
"""

from __future__ import annotations

import copy
from typing import Any

START, END = "# SOLUTION", "# END SOLUTION"
STUB = "raise NotImplementedError()  # your code here"


def strip_solutions(source: str) -> str:
    """Replace every `# SOLUTION` … `# END SOLUTION` region of a cell's source by a stub.

    Raises:
        ValueError: a region is not closed, or a marker appears without its partner.

    Example:
        >>> strip_solutions("def f():\\n    # SOLUTION\\n    return 1\\n    # END SOLUTION\\n")
        'def f():\\n    raise NotImplementedError()  # your code here\\n'
    """
    out, inside = [], False
    for number, line in enumerate(source.splitlines(keepends=True), start=1):
        marker = line.strip()
        if marker == START:
            if inside:
                raise ValueError(f"line {number}: '{START}' inside an open solution region; close it with '{END}'.")
            inside = True
            out.append(line[: len(line) - len(line.lstrip())] + STUB + "\n")
        elif marker == END:
            if not inside:
                raise ValueError(f"line {number}: '{END}' without a '{START}' before it.")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise ValueError(f"a '{START}' region is never closed; add '{END}' after the solution.")
    return "".join(out)


def student_notebook(nb: Any) -> Any:
    """A copy of an nbformat notebook with the solutions stubbed out and every output cleared."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.source = strip_solutions(cell.source)
            cell.outputs, cell.execution_count = [], None
    return nb
