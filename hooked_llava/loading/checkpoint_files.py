"""Which files of a checkpoint folder are read, and reading them without surprises.

Weights come from `model.safetensors.index.json` when present, else from one unambiguous set:
`model.safetensors`, or the complete `model-0000i-of-0000N.safetensors` shards (the same for
pickled `pytorch_model*.bin`). Other weight files beside the set are ignored with a warning; a
key found in two files, an index entry outside the folder, a non-regular file (a FIFO would
block) and unparseable JSON are errors that name the file.
"""

from __future__ import annotations

import json
import os
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from hooked_llava.loading.convert import CheckpointError


def regular_file(path: Path) -> Path:
    """`path`, if it is a regular file (or a link to one); reading a FIFO or device could block forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist.") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device or folder?); only regular files are read.")
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON of a regular file, or an error that names the file."""
    try:
        return json.loads(regular_file(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); fix or remove the file.") from err


def _index(directory: Path, index_file: Path) -> dict[str, str]:
    """The index's key → file map, with every file a plain relative path inside the folder."""
    data = read_json(index_file)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file} has no 'weight_map' from tensor names to file names.")
    for name in dict.fromkeys(weight_map.values()):
        pure = PurePosixPath(name)
        if not name or pure.is_absolute() or Path(name).is_absolute() or ".." in pure.parts or "\\" in name:
            raise CheckpointError(
                f"{index_file} points at {name!r}, which is outside the checkpoint folder {directory}; "
                "weight files must be named relative to the folder, without '..'."
            )
    return weight_map


def _unindexed(directory: Path, stem: str, suffix: str, present: list[Path]) -> list[Path]:
    """The one weight set of a folder without an index: the single file, or complete shards."""
    pattern = re.compile(rf"{re.escape(stem)}-(\d+)-of-(\d+){re.escape(suffix)}")
    shards = {p: pattern.fullmatch(p.name) for p in present}
    shards = {p: m for p, m in shards.items() if m}
    single = directory / f"{stem}{suffix}"
    totals = {int(m.group(2)) for m in shards.values()}
    if shards and (single in present or len(totals) > 1):
        names = sorted(p.name for p in shards) + ([single.name] if single in present else [])
        raise CheckpointError(
            f"{directory} holds more than one set of weights ({', '.join(names)}) and no index; "
            f"keep one set, or add {stem}{suffix}.index.json to say which files are meant."
        )
    if shards:
        (total,) = totals
        found = {int(m.group(1)): p for p, m in shards.items()}
        missing = sorted(set(range(1, total + 1)) - set(found))
        if missing:
            raise CheckpointError(f"{directory} lacks shard(s) {missing} of the {total} {stem}-*-of-* files.")
        return [found[i] for i in range(1, total + 1)]
    if single in present:
        return [single]
    if len(present) > 1:
        raise CheckpointError(
            f"{directory} holds several {suffix} files ({', '.join(p.name for p in present)}) and no index; "
            f"it is ambiguous which are the weights. Name them {stem}{suffix} or add an index."
        )
    return present


def weight_files(directory: Path, stem: str, suffix: str) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files to read (checked to be regular files), and the index's key map if any."""
    index_file = directory / f"{stem}{suffix}.index.json"
    present = sorted(directory.glob(f"*{suffix}"))
    weight_map = _index(directory, index_file) if index_file.exists() else None
    if weight_map is not None:
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = _unindexed(directory, stem, suffix, present)
    ignored = [p.name for p in present if p not in files]
    if files and ignored:
        warnings.warn(
            f"ignoring {', '.join(ignored)} in {directory}: not part of the weight set "
            f"({', '.join(p.name for p in files)}). Remove them to silence this warning.",
            stacklevel=3,
        )
    return [regular_file(f) for f in files], weight_map


def load_weights(
    files: list[Path], loader: Callable[[Path], dict[str, torch.Tensor]], weight_map: dict[str, str] | None
) -> dict[str, torch.Tensor]:
    """All tensors of `files`; a key in two files, or one the index places elsewhere, is an error."""
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for file in files:
        for key, tensor in loader(file).items():
            if key in origin:
                raise CheckpointError(
                    f"the tensor {key!r} is in both {origin[key].name} and {file.name}; "
                    "it is ambiguous which one is meant. Remove it from one of them."
                )
            state[key], origin[key] = tensor, file
    if weight_map is not None:
        _check_index(weight_map, origin)
    return state


def _check_index(weight_map: dict[str, str], origin: dict[str, Path]) -> None:
    for key, name in weight_map.items():
        if key not in origin:
            raise CheckpointError(f"the index places {key!r} in {name}, but no weight file holds it.")
        if origin[key].name != PurePosixPath(name).name:
            raise CheckpointError(f"the index places {key!r} in {name}, but it is in {origin[key].name}.")
    unlisted = sorted(set(origin) - set(weight_map))
    if unlisted:
        raise CheckpointError(f"weight files hold {len(unlisted)} tensor(s) the index does not list: {unlisted[:5]}.")
