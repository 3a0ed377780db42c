"""Put transcoders in place of the MLPs: forward hooks for `model.hooks(fwd_hooks=...)`.

Each layer's input hook stores the MLP's input; its output hook replaces the MLP's output with the
transcoder's prediction, optionally with features edited and a (constant) error term added back.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor

from hooked_llava.transcoders.transcoder import TranscoderSet

FeatureEdit = Callable[[int, Tensor], Tensor]  # (layer, acts [batch, pos, d_tc]) -> new acts


def _store(x: Tensor, hook: Any, *, store: dict[int, Tensor], layer: int) -> Tensor:
    store[layer] = x
    return x


def _replace(
    out: Tensor,
    hook: Any,
    *,
    ts: TranscoderSet,
    store: dict[int, Tensor],
    layer: int,
    errors: dict[int, Tensor] | None,
    edit: FeatureEdit | None,
) -> Tensor:
    x = store.pop(layer)
    acts = ts[layer].encode(x)
    if edit is not None:
        acts = edit(layer, acts)
    y = ts[layer].decode(acts, x).to(out.dtype)
    return y if errors is None else y + errors[layer].to(y.dtype)


def mlp_replacement_hooks(
    ts: TranscoderSet, errors: dict[int, Tensor] | None = None, edit: FeatureEdit | None = None
) -> list[tuple[str, Any]]:
    """Forward hooks that replace every MLP's output with its transcoder's output.

    Args:
        ts: the transcoders, one per layer.
        errors: per layer, a term added to the prediction (e.g. the clean run's `mlp_out - ŷ`, so that the
            unedited model is reproduced exactly); None for the transcoders alone.
        edit: called as `edit(layer, acts)` on each layer's feature activations before decoding.

    Returns:
        `(hook_name, fn)` pairs for `model.hooks(fwd_hooks=...)` or `model.run_with_hooks`.
    """
    store: dict[int, Tensor] = {}
    hooks = []
    for layer in range(len(ts)):
        hooks.append((ts.input_hook(layer), partial(_store, store=store, layer=layer)))
        replace = partial(_replace, ts=ts, store=store, layer=layer, errors=errors, edit=edit)
        hooks.append((ts.output_hook(layer), replace))
    return hooks
