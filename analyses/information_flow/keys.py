"""What determines a sweep's results, as keys that `run_sweep` compares when it resumes.

A sweep folder holds the results of one set of *settings*: the model (`model_fingerprint`), the
flows, the window, the metric, the logit-lens flag, the result format, and what the caller says
about where the examples come from (the CLI records the Shapes seed). They are written to
`settings.json` when the folder is first used; a rerun with other settings is refused with a
`SettingsChangedError` that names each changed setting (use a new folder, or `force=True` /
`--force` to discard the old results).

Each finished example also stores, in its key file (written after its tables), the key of its
*content* (`example_key`: category, prompt, answer, boxes and a hash of the image bytes), the
digest of the settings (`settings_digest`) and the digest of each of its tables. A rerun recomputes
an example whose content changed, whose settings are not the folder's, or whose files are missing,
truncated or unreadable. A `settings.json` that cannot be read is a `SweepFolderError` (`--force`
starts over). Every file is written through a temporary file of its own name (`write_atomic`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hooked_llava import HookedLlava

# Bump when the per-example files change meaning or columns (2: rel_change_pct, content keys; 3: the key file
# is written last and holds the settings' digest and each table's digest).
FORMAT = 3
# The metric the sweep records: the answer's first token at the last position (study B, METHODS.md §3).
METRIC = "p(answer first token) at last position; rel_change_pct, delta_log_prob"
SAMPLES = 64  # values hashed per weight tensor


class SweepFolderError(ValueError):
    """A sweep folder cannot be used as asked (in use, other settings, damaged `settings.json`)."""


class SettingsChangedError(SweepFolderError):
    """A sweep folder holds results computed with other settings; the message names them."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_fingerprint(model: HookedLlava) -> str:
    """A short hash of what makes the model compute what it computes, cheap enough for a 7B model.

    It covers the configuration (not the device: the same weights elsewhere give the same results up
    to float rounding), the tokenizer's vocabulary, the image processor's settings, and for every
    parameter and buffer its name, shape, dtype and 64 values at evenly spaced positions. Hashing
    samples instead of every weight reads a few kilobytes instead of gigabytes; two checkpoints that
    differ only in weights no sample hits would share a fingerprint (a fine-tune or another
    checkpoint changes every matrix, so this does not happen in practice).

    Example:
        >>> len(model_fingerprint(model))  # 16 hex digits
        16
    """
    h = hashlib.sha256(re.sub(r"device='[^']*'", "", repr(model.cfgs)).encode())
    vocab = model.tokenizer.get_vocab() if model.tokenizer is not None else {}
    h.update(json.dumps(sorted(vocab.items())).encode())
    images = getattr(model.processor, "image_processor", None)
    h.update(json.dumps(images.to_dict() if images is not None else None, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            where = torch.linspace(0, max(flat.numel() - 1, 0), min(SAMPLES, flat.numel())).long()
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            h.update(flat[where.to(flat.device)].double().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def image_digest(image: Any) -> str:
    """A hash of an example's image: of the file's bytes when the loader names a file (`.path`),
    else of the decoded pixels (mode, size and bytes).

    Example:
        >>> len(image_digest(image))
        16
    """
    path = getattr(image, "path", None)
    if path is not None:
        return _sha(Path(path).read_bytes())
    image = image() if callable(image) else image
    return _sha(f"{image.mode}{image.size}".encode() + image.tobytes())


def example_key(ex: Any) -> dict[str, Any]:
    """What determines one example's result (a `SweepExample`): category, prompt, answer, boxes, image.

    Example:
        >>> sorted(example_key(shapes_examples(1)[0]))
        ['answer', 'boxes', 'category', 'image', 'prompt']
    """
    boxes = [[float(v) for v in box] for box in ex.boxes]
    return {"category": ex.category, "prompt": ex.prompt, "answer": ex.answer, "boxes": boxes,
            "image": image_digest(ex.image)}  # fmt: skip


def settings_digest(settings: Mapping[str, Any]) -> str:
    """A short hash of a sweep's settings, stored with each finished example.

    Example:
        >>> settings_digest({"window": 9}) == settings_digest({"window": 9})
        True
    """
    return _sha(json.dumps(json.loads(json.dumps(dict(settings))), sort_keys=True).encode())


def _read_settings(path: Path, out: Path) -> Any:
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else f"not valid JSON: {err}"
        old = f"unreadable ({reason})"
    if not isinstance(old, dict):
        raise SweepFolderError(
            f"{path} is damaged ({old if isinstance(old, str) else 'not a JSON object'}), so the results in {out} "
            "cannot be matched to their settings: use --force (force=True) to delete them and recompute, or a new "
            "--out folder."
        )
    return old


def _changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = list(new) + [k for k in old if k not in new]
    return [f"{k}: {old.get(k, '(not recorded)')!r} → {new.get(k, '(not given)')!r}" for k in keys
            if old.get(k) != new.get(k)]  # fmt: skip


def claim_folder(out_dir: str | Path, settings: Mapping[str, Any], force: bool = False) -> None:
    """Make `out_dir` hold results for `settings`: record them in a folder without results, accept the
    same ones, refuse other ones naming what changed, or with `force` delete the old per-example results.

    Example:
        >>> claim_folder("runs/demo", {"window": 9})
        >>> claim_folder("runs/demo", {"window": 5}, force=True)  # without force: SettingsChangedError
    """
    out = Path(out_dir)
    path, done = out / "settings.json", out / "examples"
    has_results = done.exists() and any(done.iterdir())  # a folder without results has nothing to protect
    settings = json.loads(json.dumps(dict(settings)))  # as JSON will read it back (tuples become lists)
    if has_results:
        try:
            old = _read_settings(path, out)
        except SweepFolderError:
            if not force:
                raise
            old = None
        if old != settings:
            if not force:
                raise SettingsChangedError(
                    f"{out} holds sweep results computed with other settings ({'; '.join(_changes(old, settings))})."
                    " Use a new --out folder, or --force (force=True) to delete those results and recompute."
                )
            shutil.rmtree(done, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(settings, indent=1, sort_keys=True))


def write_atomic(path: Path, text: str) -> None:
    """Write `path` through a temporary file of a name no other writer uses, then rename it into place.

    Example:
        >>> write_atomic(Path("settings.json"), "{}")  # readers see the old file or the new one, never a part
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
