"""Transcoder sets on disk, in circuit-tracer's format, and `load_transcoders`.

A folder holds `config.yaml` and one `layer_{i}.safetensors` per layer:

    model_kind: transcoder_set
    feature_input_hook: ln2.hook_normalized   # circuit-tracer's per-block suffix
    feature_output_hook: hook_mlp_out
    activation: topk                          # relu | topk | (absent: JumpReLU if thresholds are stored, else ReLU)
    k: 16
    scan: shapes-llava-transcoders

Each layer file has `W_enc [d_tc, d_model]`, `W_dec [d_tc, d_model]`, `b_enc`, `b_dec`, and optionally
`activation_function.threshold` (JumpReLU), `W_skip` and `k` (written by circuit-tracer's TopK sets).
A config may instead list the layer files under `transcoders:` (local paths, relative to the folder).
Our extension for sets whose layers sit at unlike hooks (the vision MLPs, then the projector): the two
hook keys may be lists with one full hook name per layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hooked_llava.transcoders.transcoder import (
    JumpReLU,
    ReLU,
    SingleLayerTranscoder,
    TopK,
    TranscoderSet,
    activation_name,
)

SHIPPED = {
    "shapes-llava": "shapes-llava-transcoders",
    "shapes-llava-transcoders": "shapes-llava-transcoders",
    "shapes-llava-vision": "shapes-llava-vision-transcoders",
    "shapes-llava-vision-transcoders": "shapes-llava-vision-transcoders",
}
_KNOWN_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold", "k"}


def _template(hook: str | list[str]) -> str | list[str]:
    """circuit-tracer's per-block hook suffix as a full template (`ln2.hook_normalized` → `blocks.{layer}.…`);
    a list of per-layer hook names stays as it is."""
    if not isinstance(hook, str):
        return list(hook)
    return hook if "{layer}" in hook else f"blocks.{{layer}}.{hook}"


def _suffix(template: str | list[str]) -> str | list[str]:
    """The inverse of `_template` where the hook lives inside a block; else the template (or list) as it is."""
    prefix = "blocks.{layer}."
    if not isinstance(template, str):
        return list(template)
    return template[len(prefix) :] if template.startswith(prefix) else template


def _folder(name_or_dir: str | Path) -> Path:
    folder = Path(name_or_dir).expanduser()
    if folder.is_dir():
        return folder
    if str(name_or_dir) in SHIPPED:
        from hooked_llava.shapes import checkpoint_path

        return checkpoint_path(SHIPPED[str(name_or_dir)])
    raise FileNotFoundError(
        f"no transcoder folder {str(name_or_dir)!r}: give a folder holding config.yaml and layer_{{i}}.safetensors, "
        f"or a shipped name ({', '.join(SHIPPED)})."
    )


def _activation(config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> nn.Module:
    kind = config.get("activation")
    if kind == "topk":
        k = config.get("k", tensors["k"].item() if "k" in tensors else None)
        if k is None:
            raise ValueError("config.yaml says activation: topk but gives no k; add e.g. `k: 16`.")
        return TopK(int(k))
    if kind in (None, "jump_relu", "jumprelu") and "activation_function.threshold" in tensors:
        return JumpReLU(tensors["activation_function.threshold"])
    if kind in (None, "relu"):
        return ReLU()
    raise ValueError(f"unknown activation {kind!r} in config.yaml; expected relu, topk or jump_relu.")


def load_layer(path: Path, layer: int, config: dict[str, Any]) -> SingleLayerTranscoder:
    """One `layer_{i}.safetensors` as a `SingleLayerTranscoder` (keys checked)."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = {"W_enc", "W_dec", "b_enc", "b_dec"} - tensors.keys()
    unknown = tensors.keys() - _KNOWN_KEYS
    if missing or unknown:
        raise ValueError(f"{path}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}.")
    d_tc, d_model = tensors["W_enc"].shape
    if tensors["W_dec"].shape != (d_tc, d_model):
        raise ValueError(f"{path}: W_dec is {tuple(tensors['W_dec'].shape)}, expected {(d_tc, d_model)} like W_enc.")
    tc = SingleLayerTranscoder(d_model, d_tc, _activation(config, tensors), layer, "W_skip" in tensors)
    state = {k: v for k, v in tensors.items() if k != "k"}
    tc.load_state_dict(state, strict=True)
    return tc


def load_transcoders(name_or_dir: str | Path, device: Any = None, dtype: torch.dtype = torch.float32) -> TranscoderSet:
    """A transcoder set from a folder in circuit-tracer's format, or a shipped name (`"shapes-llava"`).

    Args:
        name_or_dir: folder with `config.yaml` and `layer_{i}.safetensors`, or a shipped name.
        device: where to put the weights (CPU by default).
        dtype: their dtype.

    Returns:
        The `TranscoderSet`: `len(ts)` layers, `ts[l].encode(x)`, `ts[l].decode(a)`, and the hook templates
        `ts.feature_input_hook` / `ts.feature_output_hook` (with a `{layer}` field).
    """
    folder = _folder(name_or_dir)
    config_file = folder / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.yaml; is it a transcoder folder in circuit-tracer's format?")
    config = yaml.safe_load(config_file.read_text())
    if config.get("model_kind") != "transcoder_set":
        raise ValueError(
            f"{config_file}: model_kind is {config.get('model_kind')!r}; only per-layer sets (transcoder_set) load."
        )
    if "transcoders" in config:
        paths = [folder / p for p in config["transcoders"]]
    else:
        paths = sorted(folder.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
        if [int(p.stem.split("_")[1]) for p in paths] != list(range(len(paths))):
            raise ValueError(
                f"{folder}: need layer_0 .. layer_{len(paths) - 1}.safetensors; got {[p.name for p in paths]}"
            )
    if not paths:
        raise FileNotFoundError(f"{folder} holds no layer_{{i}}.safetensors files.")
    layers = [load_layer(p, i, config) for i, p in enumerate(paths)]
    ts = TranscoderSet(
        layers, _template(config["feature_input_hook"]), _template(config["feature_output_hook"]), config.get("scan")
    )
    return ts.to(device=device, dtype=dtype)


def save_transcoders(ts: TranscoderSet, folder: str | Path, scan: str | None = None) -> Path:
    """Write a set in circuit-tracer's format (`config.yaml`, `layer_{i}.safetensors`); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    act = ts[0].activation_function
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "feature_input_hook": _suffix(ts.feature_input_hook),
        "feature_output_hook": _suffix(ts.feature_output_hook),
        "scan": scan or ts.scan or folder.name,
    }
    if not isinstance(act, JumpReLU):
        config["activation"] = activation_name(act)
    if isinstance(act, TopK):
        config["k"] = act.k
    for tc in ts:
        state = {k: v.detach().cpu().float().contiguous() for k, v in tc.state_dict().items()}
        save_file(state, str(folder / f"layer_{tc.layer}.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
