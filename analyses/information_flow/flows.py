"""Information flows for attention knockout (study B, METHODS.md §3): which queries may not see which keys.

A flow is a (source, target) pair of position sets: roles ("image", "question", "last", "related",
"other_image", ...) or explicit positions. `resolve_flows` names them, `flow_mask` turns one side
into a per-row mask, and `window_layers` places the window of layers blocked for a plotted layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from analyses import ranges
from hooked_llava import LlavaInputs
from hooked_llava.inputs.geometry import BoxRule, related_mask

Positions = str | Sequence[int] | Tensor
FlowSpec = str | tuple[Positions, Positions]
# The study's six flows, as (source, target) position sets.
FLOWS: dict[str, tuple[str, str]] = {
    "question->last": ("question", "last"),
    "image->last": ("image", "last"),
    "image->question": ("image", "question"),
    "last->last": ("last", "last"),
    "related->question": ("related", "question"),
    "other->question": ("other_image", "question"),
}
_ROLE_ALIASES = {"other": "other_image", "related_image": "related"}


def window_layers(layer: int, n_layers: int, window: int = 9) -> range:
    """Layers blocked for plotted `layer`, placed as study B's code places them (METHODS.md §3):
    `range(max(0, l - w // 2), min(L, l - (-w // 2)))`, i.e. `w // 2` layers before `l` and
    `w - 1 - w // 2` after (9 gives l-4 ... l+4; an even 4 gives l-2 ... l+1), clipped at the ends.

    Example:
        >>> list(window_layers(0, 32))  # [0, 1, 2, 3, 4]
    """
    layer = ranges.index(layer, n_layers, "layer")
    window = ranges.count(window, "window")
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def flow_mask(inputs: LlavaInputs, where: Positions, box_rule: BoxRule = "exclusive") -> Tensor:
    """`inputs.as_mask` with explicit positions range-checked, and the "related" / "other_image"
    roles built with `box_rule` (see `hooked_llava.inputs.geometry.box_to_patches`).

    Example:
        >>> flow_mask(inputs, "related", box_rule="pil")  # the study's one-pixel-wider boxes
    """
    where = ranges.positions(inputs, where)
    if isinstance(where, str) and _ROLE_ALIASES.get(where, where) in ("related", "other_image"):
        related = related_mask(inputs, box_rule)
        return related if _ROLE_ALIASES.get(where, where) == "related" else inputs.image_mask & ~related
    return inputs.as_mask(where)


def resolve_flows(flows: FlowSpec | Sequence[FlowSpec] | Mapping[str, tuple] | None) -> dict[str, tuple]:
    """Flow names ("image->last", "Image→Last", "other->question") or (source, target) pairs, by label.

    Example:
        >>> resolve_flows(["image->last", ("question", [5, 6])])
        {'image->last': ('image', 'last'), 'question->[5, 6]': ('question', [5, 6])}
    """
    if flows is None:
        return dict(FLOWS)
    if isinstance(flows, Mapping):
        resolved = dict(flows)
    else:
        resolved = _resolve_items([flows] if isinstance(flows, str) else list(flows))
    if not resolved:
        raise ValueError(f"flows is empty: give at least one flow, e.g. {list(FLOWS)[:2]}, or None for all six.")
    return resolved


def _resolve_items(items: list) -> dict[str, tuple]:
    resolved = {}
    for item in items:
        if isinstance(item, str):
            name = item.lower().replace("→", "->").replace(" ", "")
            if name not in FLOWS and name.count("->") != 1:
                raise ValueError(f"unknown flow {item!r}: use 'source->target' (e.g. {list(FLOWS)}) or a pair.")
            source, target = FLOWS.get(name) or tuple(_ROLE_ALIASES.get(r, r) for r in name.split("->"))
            resolved[name] = (source, target)
        elif isinstance(item, tuple) and len(item) == 2:
            label = (p if isinstance(p, str) else str(torch.as_tensor(p).tolist()) for p in item)
            resolved["->".join(label)] = item
        else:
            raise TypeError(f"a flow is a name like 'image->last' or a (source, target) pair, got {item!r}.")
    return resolved
