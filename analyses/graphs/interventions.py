"""`intervene`: the model's logits with chosen transcoder features set to chosen values.

Every MLP is replaced by its transcoder plus the clean run's error term `mlp_out − ŷ` (a constant), so
with no interventions the model's own logits come back. Features not set are re-encoded from the MLP's
(possibly changed) input, so the effect of an intervention propagates through later features. With
`freeze_attention`, every attention pattern keeps its clean value, and with `freeze_norms` every norm's
scale does, as in the graph's replacement model (both frozen: the edit's effect is linear, as the graph's edges).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_llava.transcoders.splice import mlp_replacement_hooks


def _set_features(layer: int, acts: Tensor, *, edits: Mapping[tuple[int, int, int], float]) -> Tensor:
    acts = acts.clone()
    for (lay, pos, feature), value in edits.items():
        if lay == layer:
            acts[:, pos, feature] = value
    return acts


def _frozen(value: Tensor, hook: Any, *, clean: dict[str, Tensor]) -> Tensor:
    return clean[hook.name]


def _check(edits: Mapping[tuple[int, int, int], float], ts: Any, n_pos: int) -> None:
    for key in edits:
        if len(key) != 3:
            raise ValueError(f"intervention keys are (layer, pos, feature); got {key!r}.")
        layer, pos, feature = key
        if not (0 <= layer < len(ts) and -n_pos <= pos < n_pos and 0 <= feature < ts.d_transcoder):
            raise ValueError(
                f"intervention {key} is out of range: layers 0..{len(ts) - 1}, positions 0..{n_pos - 1}, "
                f"features 0..{ts.d_transcoder - 1}."
            )


@torch.no_grad()
def intervene(
    model: Any,
    inputs: Any,
    ts: Any,
    interventions: Mapping[tuple[int, int, int], float],
    freeze_attention: bool = False,
    freeze_norms: bool = False,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the features `(layer, pos, feature)` set to the given values (in every row of `inputs`).

    Args:
        model: the HookedLlava.
        inputs: a `LlavaInputs`.
        ts: the transcoders.
        interventions: `{(layer, pos, feature): value}`; `{}` returns the model's own logits.
        freeze_attention: keep every attention pattern at its clean value.
        freeze_norms: keep every language-model norm's scale (`ln1`, `ln2`, `ln_final`) at its clean value.

    Returns:
        Logits `[batch, pos, d_vocab]`.
    """
    _check(interventions, ts, inputs.input_ids.shape[1])
    n = len(ts)
    names = [ts.input_hook(layer) for layer in range(n)] + [ts.output_hook(layer) for layer in range(n)]
    layers = range(model.cfg.n_layers)
    patterns = [f"blocks.{layer}.attn.hook_pattern" for layer in layers] if freeze_attention else []
    if freeze_norms:
        patterns += [f"blocks.{layer}.{ln}.hook_scale" for layer in layers for ln in ("ln1", "ln2")]
        patterns.append("ln_final.hook_scale")
    _, cache = model.run_with_cache(inputs, names_filter=names + patterns)
    errors = {}
    for layer, tc in enumerate(ts):
        x = cache[ts.input_hook(layer)]
        errors[layer] = cache[ts.output_hook(layer)] - tc.decode(tc.encode(x), x)
    hooks = mlp_replacement_hooks(ts, errors, partial(_set_features, edits=dict(interventions)))
    clean = {name: cache[name] for name in patterns}
    hooks += [(name, partial(_frozen, clean=clean)) for name in patterns]
    with model.hooks(fwd_hooks=hooks):
        return model(inputs)
