"""Placing one `HookedLlava` across several devices (`from_pretrained(..., device_map=...)`).

The model is cut into *parts*, in forward order: "vision" (CLIP tower), "projector" (with the
LLaVA-NeXT `image_newline`), "embed" (`embed.W_E`), "blocks.0" … "blocks.{n-1}", "ln_final" and
"unembed" (`unembed.w_u`). `plan_devices` maps every part to a device; `place` moves the parts there and
registers forward pre-hooks that move a module's tensor inputs onto its device, so the residual
stream follows the blocks (and hooks, `run_with_cache`, patching, `run_blocks` and `generate` work
unchanged: each cached activation stays on the device of the part that made it; pass
`run_with_cache(..., device="cpu")` to gather them for cache methods that stack layers).
A model on one device gets no plan and no pre-hooks: its forward is unchanged. On a placed model,
logits come back on the "unembed" device and `generate`'s tokens on the "embed" device; stacked
weight views across blocks (`model.W_Q`, ...) need the blocks on one device, and moving a placed
model again (`model.to(...)`) is not supported: load it again with another `device_map`.

`device_map` may be:
    - "auto": every visible CUDA device (CPU alone when there is none), parts split as below;
    - an int n: CUDA devices 0..n-1;
    - a list of devices, e.g. ["cuda:0", "cpu"]: contiguous parts, balanced by parameter bytes;
    - a dict naming every part: "vision", "projector", "embed", "blocks" (all), "blocks.i" or a slice
      "blocks.a:b" (half-open, as Python), "ln_final", "unembed" → device. A later key wins.

Parameter memory per part (`part_bytes`; parameters × bytes per dtype, float16/bfloat16 = 2 bytes;
the vision tower holds the computed CLIP blocks only; activations and KV cache come on top):

    | model (float16)     | vision | projector | embed  | one block | all blocks | ln_final | unembed | total    |
    |---------------------|--------|-----------|--------|-----------|------------|----------|---------|----------|
    | LLaVA-1.5-7B, 32 blocks | 582 MB | 42 MB | 263 MB | 405 MB | 12.95 GB | 8 kB | 263 MB | 14.10 GB |
    | LLaVA-1.5-13B, 40 blocks | 582 MB | 63 MB | 328 MB | 634 MB | 25.38 GB | 10 kB | 328 MB | 26.68 GB |
    | LLaVA-NeXT-34B, 60 blocks | 582 MB | 117 MB | 918 MB | 1.12 GB | 66.94 GB | 14 kB | 918 MB | 69.48 GB |

(MB = 10^6 bytes, GB = 10^9; float32 doubles every figure. So the 7B fits one 24 GB GPU, the 13B two,
and the 34B (Yi-34B with grouped KV heads) needs two 40 GB or one 80 GB GPU for its weights alone.
`tests/test_devices.py` recomputes this table from the published configs.)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

HEAD_PARTS = ("vision", "projector", "embed")
TAIL_PARTS = ("ln_final", "unembed")
_BLOCK_KEY = re.compile(r"blocks(?:\.(\d+)(?::(\d+))?)?")


def part_names(cfgs: Any) -> list[str]:
    """The parts of a model with configs `cfgs`, in forward order (no vision parts for text-only models)."""
    head = HEAD_PARTS if cfgs.vision is not None else ("embed",)
    return [*head, *(f"blocks.{i}" for i in range(cfgs.lm.n_layers)), *TAIL_PARTS]


def part_of(name: str) -> str:
    """The part that holds the parameter or module `name` (e.g. "blocks.3.attn.W_Q" → "blocks.3")."""
    first = name.split(".")[0]
    if first == "blocks":
        return ".".join(name.split(".")[:2])
    return "projector" if first == "image_newline" else first


def part_numels(model: nn.Module) -> dict[str, int]:
    """Parameters per part (works on a model built on the meta device)."""
    counts = dict.fromkeys(part_names(model.cfgs), 0)
    for name, p in model.named_parameters():
        counts[part_of(name)] += p.numel()
    return counts


def part_bytes(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Bytes of parameters per part in `dtype`."""
    size = torch.empty(0, dtype=dtype).element_size()
    return {part: n * size for part, n in part_numels(model).items()}


def plan_devices(cfgs: Any, device_map: Any, numels: Mapping[str, int] | None = None) -> dict[str, torch.device]:
    """The device of every part (see the module docstring for the forms of `device_map`).

    `numels` (parameters per part, from `part_numels`) balances list, int and "auto" maps; without it
    every block counts alike and the other parts count as nothing.
    """
    parts = part_names(cfgs)
    if isinstance(device_map, Mapping):
        return _explicit(parts, device_map)
    devices = _device_list(device_map)
    sizes = [numels[p] if numels is not None else int(p.startswith("blocks.")) for p in parts]
    return dict(zip(parts, _balanced(sizes, devices), strict=True))


def _device_list(device_map: Any) -> list[torch.device]:
    n_cuda = torch.cuda.device_count()
    if device_map == "auto":
        return [torch.device("cuda", i) for i in range(n_cuda)] or [torch.device("cpu")]
    if isinstance(device_map, bool) or not isinstance(device_map, (int, Sequence)) or isinstance(device_map, str):
        raise ValueError(
            f"device_map={device_map!r} is not understood: pass 'auto', a number of CUDA devices, a list of "
            "devices such as ['cuda:0', 'cpu'], or a dict from parts ('vision', 'blocks.0:16', ...) to devices."
        )
    if isinstance(device_map, int):
        if not 1 <= device_map <= n_cuda:
            raise ValueError(
                f"device_map={device_map} asks for {device_map} CUDA devices, but {n_cuda} are visible: pass at most "
                f"{n_cuda}, or a list of devices such as ['cuda:0', 'cpu']."
            )
        return [torch.device("cuda", i) for i in range(device_map)]
    if not device_map:
        raise ValueError("device_map is an empty list: name at least one device, e.g. ['cuda:0', 'cpu'].")
    return [torch.device(d) for d in device_map]


def _balanced(sizes: list[int], devices: list[torch.device]) -> list[torch.device]:
    """Contiguous runs of parts, one per device in order, each near `sum(sizes) / len(devices)`:
    a part goes to the device whose share holds its midpoint."""
    total, before, out = max(sum(sizes), 1), 0, []
    for size in sizes:
        share = int((before + size / 2) / total * len(devices))
        out.append(devices[min(share, len(devices) - 1)])
        before += size
    return out


def _explicit(parts: list[str], device_map: Mapping[str, Any]) -> dict[str, torch.device]:
    n_layers = sum(p.startswith("blocks.") for p in parts)
    plan: dict[str, torch.device] = {}
    for key, device in device_map.items():
        for part in _expand(str(key), parts, n_layers):
            plan[part] = torch.device(device)
    missing = [p for p in parts if p not in plan]
    if missing:
        raise ValueError(
            f"device_map places no device for {_short(missing)}: name every part ({', '.join(HEAD_PARTS)}, "
            "blocks or blocks.a:b, ln_final, unembed)."
        )
    return {p: plan[p] for p in parts}


def _expand(key: str, parts: list[str], n_layers: int) -> list[str]:
    match = _BLOCK_KEY.fullmatch(key)
    if match is None:
        if key not in parts:
            raise ValueError(f"device_map key {key!r} is not a part of this model; parts: {_short(parts)}.")
        return [key]
    first, stop = match.groups()
    if first is None:
        return [f"blocks.{i}" for i in range(n_layers)]
    lo, hi = int(first), int(stop) if stop is not None else int(first) + 1
    if not lo < hi <= n_layers:
        raise ValueError(f"device_map key {key!r} is outside the {n_layers} blocks (ranges are half-open, a:b).")
    return [f"blocks.{i}" for i in range(lo, hi)]


def _short(parts: list[str]) -> str:
    names = [p for p in parts if not p.startswith("blocks.")]
    blocks = [p for p in parts if p.startswith("blocks.")]
    if blocks:
        names.append(blocks[0] if len(blocks) == 1 else f"{blocks[0]}…{blocks[-1].split('.')[1]}")
    return ", ".join(names)


# --- placing a model ---------------------------------------------------------------------------
def move(t: Tensor, device: torch.device) -> Tensor:
    """The one place where an activation crosses to `device` (a no-op when it is already there)."""
    return t.to(device)


def _moved(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return move(value, device)
    if isinstance(value, tuple):
        return tuple(_moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


def _mover(device: torch.device) -> Any:
    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _moved(args, device), _moved(kwargs, device)

    return pre_hook


def place(model: nn.Module, plan: Mapping[str, torch.device]) -> None:
    """Move every part of `model` to its planned device; with more than one device, register the
    pre-hooks that carry inputs across and keep the plan as `model._device_plan`."""
    for name, p in model.named_parameters():
        p.data = move(p.data, plan[part_of(name)])
    if len(set(plan.values())) < 2:
        return
    for name in plan:
        if name != "embed":  # the token embedding: `embed_inputs` moves what it needs
            model.get_submodule(name).register_forward_pre_hook(_mover(plan[name]), with_kwargs=True)
    model._device_plan = dict(plan)


def device_plan(model: nn.Module) -> dict[str, torch.device]:
    """Where each part of `model` lives: its plan, or every part on the device of its parameters."""
    plan = getattr(model, "_device_plan", None)
    if plan is not None:
        return dict(plan)
    device = next(model.parameters()).device
    return dict.fromkeys(part_names(model.cfgs), device)


def block_devices(model: nn.Module, default: Any) -> list[torch.device] | Any:
    """Each block's device for a placed model (e.g. for its KV cache), else `default`."""
    plan = getattr(model, "_device_plan", None)
    return default if plan is None else [plan[f"blocks.{i}"] for i in range(model.cfg.n_layers)]


def to_block(model: nn.Module, layer: int, *values: Any) -> tuple:
    """`values` (residual, masks, rotary tables) moved to block `layer`'s device."""
    device = model._device_plan[f"blocks.{layer}"]
    return tuple(_moved(v, device) for v in values)
