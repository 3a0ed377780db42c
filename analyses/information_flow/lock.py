"""One sweep per folder at a time: an OS file lock on `{out}/.sweep.lock`.

`sweep_lock(out)` takes an exclusive `flock` on the folder's lock file without waiting; a second
sweep into the same folder (another process, or another thread of this one) is refused with a
`SweepLockedError` that names the holder. The operating system releases the lock when its holder
exits, however it exits (a killed process leaves no stale lock behind). The same thread may take
the lock again while it holds it (the CLI holds it around `run_sweep` and the writing of the tables).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

from analyses.information_flow.keys import SweepFolderError

LOCK_NAME = ".sweep.lock"
_held: dict[tuple[str, int], int] = {}  # (folder, thread) -> depth, for re-entry by the holder
_guard = threading.Lock()


class SweepLockedError(SweepFolderError):
    """Another sweep is running in this folder; the message names its process."""


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return f"process {text}" if text else "another process"


@contextlib.contextmanager
def sweep_lock(out_dir: str | Path) -> Iterator[Path]:
    """Hold `out_dir` for one sweep; `SweepLockedError` at once if another sweep holds it.

    Example:
        >>> with sweep_lock("runs/demo") as folder:  # run_sweep takes it itself; the CLI holds it around the tables
        ...     (folder / "notes.txt").write_text("only this run writes here")
        25
    """
    out = Path(out_dir)
    key = (str(out.resolve()), threading.get_ident())
    with _guard:
        if key in _held:
            _held[key] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield out
        finally:
            with _guard:
                _held[key] -= 1
        return
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise SweepLockedError(
                f"{out} is in use by another sweep ({_holder(path)}): wait for it to finish, or use another "
                "--out folder (a folder holds one sweep at a time)."
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else '?'}".encode())
        with _guard:
            _held[key] = 1
        try:
            yield out
        finally:
            with _guard:
                del _held[key]
    finally:
        os.close(fd)  # closing the descriptor releases the lock
