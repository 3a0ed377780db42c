"""Where a model name points: a local directory, a shipped checkpoint, or a hub id.

`resolve` decides without touching the network when it can: an existing local directory always
wins (even over a shipped model of the same name, with a warning), anything that looks like a
path is never sent to the hub, and only a string shaped exactly like `org/name` is downloaded.
The hub is asked under a deadline (`HOOKED_LLAVA_HUB_TIMEOUT` seconds, default `HUB_TIMEOUT_S`),
so a stalled endpoint or proxy gives a clear error instead of hanging.
"""

from __future__ import annotations

import fnmatch
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"  # hooked_llava/checkpoints
HUB_TIMEOUT_S = 30.0  # seconds for the hub's first answer; the whole failure stays under 60 s
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_FILE_SUFFIXES = {".safetensors", ".bin", ".json", ".pt", ".pth", ".ckpt", ".gguf", ".txt", ".zip", ".tar", ".gz"}


def hub_timeout() -> float:
    """The hub deadline in seconds: `HOOKED_LLAVA_HUB_TIMEOUT` if set, else `HUB_TIMEOUT_S`."""
    raw = os.environ.get("HOOKED_LLAVA_HUB_TIMEOUT")
    if raw is None:
        return HUB_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise ValueError(f"HOOKED_LLAVA_HUB_TIMEOUT={raw!r} must be a number of seconds in (0, 600].")
    return value


def _shipped_names() -> list[str]:
    """The shipped models (folders with a `config.json`; the shipped SAE is not a model)."""
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "config.json").is_file()) if SHIPPED.is_dir() else []


def looks_like_path(name: str) -> bool:
    """True for strings a person means as a file-system path rather than a hub id `org/name`."""
    if name in (".", "..") or name.startswith(("./", "../", "~", "/", ".")):
        return True
    if "\\" in name or ":" in name or name.count("/") > 1 or name.endswith("/"):
        return True
    return Path(name).suffix.lower() in _FILE_SUFFIXES


def resolve(name_or_dir: str | Path) -> Path:
    """A local directory, a shipped short name (e.g. "shapes-llava"), or a hub id `org/name` (downloaded).

    A local directory wins over a shipped model of the same name. A `Path`, or a string that looks
    like a path, is never looked up on the hub.
    """
    name = str(name_or_dir)
    local = Path(name).expanduser()
    shipped = SHIPPED / name if name in _shipped_names() else None
    if local.is_dir():
        if shipped is not None:
            warnings.warn(
                f"loading the local folder {local.resolve()}, not the shipped model {name!r} of the same name; "
                f"pass {shipped} to load the shipped one.",
                stacklevel=3,
            )
        return local
    if local.exists():
        raise FileNotFoundError(f"{name} is a file, not a model directory; pass the folder that holds config.json.")
    if shipped is not None:
        return shipped
    if isinstance(name_or_dir, Path) or looks_like_path(name) or not _HUB_ID.fullmatch(name) or ".." in name:
        raise FileNotFoundError(
            f"no such directory: {name!r} (looked in {Path.cwd()}). It is not a shipped model "
            f"({', '.join(_shipped_names()) or 'none'}) either, and hub ids look like 'org/name'."
        )
    return download(name)


def _within(seconds: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(*args, **kwargs)`, or `TimeoutError` once `seconds` pass (the call is left in a daemon thread)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True, name="hooked-llava-hub")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _offline() -> bool:
    return any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def download(repo_id: str) -> Path:
    """Fetch a hub repository's top-level config, tokenizer and weight files; the cache if offline.

    The repository's file list is asked for under `hub_timeout()`; if the hub does not answer, a
    complete cached copy is used when there is one, and otherwise the error says what to do.
    """
    from huggingface_hub import snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None  # huggingface_hub reads it only at import
    try:
        if _offline():
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        return _fetch(repo_id, endpoint, hub_timeout())
    except Exception as err:  # the hub client raises many types; say what we tried
        raise FileNotFoundError(_hub_message(repo_id, endpoint, err)) from err


def _fetch(repo_id: str, endpoint: str | None, timeout: float) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        info = _within(timeout, HfApi(endpoint=endpoint).model_info, repo_id, timeout=timeout)
    except Exception as err:
        if not _is_network_error(err):
            raise
        try:  # the hub is unreachable: a complete cached copy still serves
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:  # noqa: BLE001 - report the network failure, not the cache miss
            raise err from None
    names = [s.rfilename for s in info.siblings or [] if "/" not in s.rfilename]
    wanted = [f for f in names if any(fnmatch.fnmatch(f, p) for p in HUB_FILES)]
    if not any(f.endswith(".safetensors") for f in wanted):
        raise FileNotFoundError(f"the hub repository {repo_id!r} has no safetensors weights at its top level.")
    paths = [hf_hub_download(repo_id, f, revision=info.sha, endpoint=endpoint, etag_timeout=timeout) for f in wanted]
    return Path(paths[0]).parent


def _bases(err: Exception) -> set[str]:
    return {c.__name__ for c in type(err).__mro__}


def _is_network_error(err: Exception) -> bool:
    """No answer (timeout, refused, reset, DNS): not a hub that answered "not found" or "forbidden"."""
    return isinstance(err, (TimeoutError, ConnectionError)) or "TransportError" in _bases(err)


def _hub_message(repo_id: str, endpoint: str | None, err: Exception) -> str:
    where = endpoint or "https://huggingface.co"
    if isinstance(err, TimeoutError) or "TimeoutException" in _bases(err):
        cause = f"the hub at {where} did not answer within {hub_timeout():g} s (HOOKED_LLAVA_HUB_TIMEOUT)"
    else:
        cause = f"the hub at {where} failed ({type(err).__name__}: {err})"
    return (
        f"could not load {repo_id!r}: no local folder of that name exists in {Path.cwd()}, it is not a shipped "
        f"model ({', '.join(_shipped_names()) or 'none'}), and {cause}. Pass a local directory (e.g. "
        f"'./{repo_id.split('/')[-1]}'), or set HF_HUB_OFFLINE=1 to use only the local Hugging Face cache."
    )
