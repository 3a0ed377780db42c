"""What determines a sweep's results, as keys that `run_sweep` compares when it resumes.

A sweep folder holds the results of one set of *settings*: the model (`model_fingerprint`), the
flows, the window, the metric, the logit-lens flag, the result format, and what the caller says
about where the examples come from (the CLI records the Shapes seed). They are written to
`settings.json` when the folder is first used; a rerun with other settings is refused with a
`SettingsChangedError` that names each changed setting (use a new folder, or `force=True` /
`--force` to discard the old results).

Each finished example also stores the key of its *content* (`example_key`: category, prompt,
answer, boxes and a hash of the image bytes). A rerun whose example of the same id has other
content recomputes that example.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hooked_llava import HookedLlava

# Bump when the per-example files change meaning or columns (2: rel_change_pct, content keys).
FORMAT = 2
# The metric the sweep records: the answer's first token at the last position (study B, METHODS.md §3).
METRIC = "p(answer first token) at last position; rel_change_pct, delta_log_prob"
SAMPLES = 64  # values hashed per weight tensor


class SettingsChangedError(ValueError):
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
    old = (json.loads(path.read_text()) if path.exists() else {}) if has_results else None
    settings = json.loads(json.dumps(dict(settings)))  # as JSON will read it back (tuples become lists)
    if old is not None and old != settings:
        if not force:
            raise SettingsChangedError(
                f"{out} holds sweep results computed with other settings ({'; '.join(_changes(old, settings))}). "
                "Use a new --out folder, or --force (force=True) to delete those results and recompute."
            )
        shutil.rmtree(done, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1, sort_keys=True))
    os.replace(tmp, path)
