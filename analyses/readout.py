"""Reading activations out of a forward pass: the helpers every analysis shares.

Resolves a role name or explicit positions to per-row indices (`lens_positions`), collects
activations at chosen positions with temporary hooks (`collect`, `at_positions`), and reads
residual vectors through the final norm and the unembedding (`final_norm`, `read_out`).

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses import ranges
from hooked_llava import HookedLlava, LlavaInputs

Positions = str | Sequence[int] | Tensor


def lens_positions(inputs: LlavaInputs, positions: Positions = "last") -> Int[Tensor, "batch n_pos"]:
    """Per-row sequence positions of a role name or of explicit positions.

    Args:
        inputs: the prepared batch.
        positions: a role ("image", "question", "last", "text", "related", ...), a list of
            positions shared by every row (negative ones count back from each row's last real
            token), an int
            tensor `[batch, n_pos]` of per-row positions, or a bool mask `[batch, pos]`.
            Positions outside the sequence raise an error naming the valid range.

    Returns:
        `[batch, n_pos]` indices into the sequence. Rows must have the same number of positions
        (true for "last" and "image" with one image per row); otherwise a ValueError says to
        pass one row at a time (`inputs[i]`). This keeps every result a dense tensor.

    Example:
        >>> lens_positions(inputs, "image").shape  # [batch, tokens_per_image]
    """
    device, given = inputs.input_ids.device, positions
    positions = ranges.positions(inputs, positions)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        rows = [row.nonzero()[:, 0] for row in positions.to(device).expand_as(inputs.input_ids)]
    elif isinstance(positions, Tensor):
        return positions
    else:
        rows = inputs.positions(positions)
    counts = sorted({len(r) for r in rows})
    if counts == [0]:
        raise ValueError(f"no positions selected by {given!r} in any row.")
    if len(counts) > 1:
        raise ValueError(
            f"{given!r} selects a different number of positions per row ({counts}); "
            "analyse the rows one at a time (inputs[i]) or pass an explicit [batch, n_pos] tensor."
        )
    return torch.stack(rows)


def _keep(act: Tensor, hook: Any, store: dict[str, Tensor], select: Callable[[Tensor], Tensor]) -> Tensor:
    """Recording hook: stores `select(act)` and returns the activation unchanged."""
    store[hook.name] = select(act)
    return act


def collect(
    model: HookedLlava, inputs: LlavaInputs, selects: Mapping[str, Callable[[Tensor], Tensor]], **forward: Any
) -> dict[str, Tensor]:
    """Run the model once and keep `select(activation)` for each hook name.

    The hooks are temporary (`run_with_hooks`), so they are removed even if the forward raises.

    Args:
        model: the model.
        inputs: the prepared batch.
        selects: hook name → function reducing that activation (e.g. to chosen positions).
        **forward: extra keyword arguments for the forward pass (e.g. `stop_at_layer`).

    Returns:
        Hook name → the reduced activation.

    Example:
        >>> acts = collect(model, inputs, {"hook_embed": lambda a: a[:, -1]}, stop_at_layer=0)
    """
    store: dict[str, Tensor] = {}
    hooks = [(name, partial(_keep, store=store, select=fn)) for name, fn in selects.items()]
    model.run_with_hooks(inputs, fwd_hooks=hooks, return_type=None, **forward)
    return store


def at_positions(pos: Int[Tensor, "batch n_pos"]) -> Callable[[Tensor], Tensor]:
    """A `collect` selector taking `[batch, pos, ...]` activations to `[batch, n_pos, ...]`.

    Example:
        >>> select = at_positions(lens_positions(inputs, "image"))
        >>> collect(model, inputs, {"hook_embed": select}, stop_at_layer=0)["hook_embed"].shape  # [2, 16, 64]
    """
    rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
    return lambda act: act[rows.to(act.device), pos.to(act.device)]


def final_norm(model: HookedLlava, x: Float[Tensor, "*lead d_model"]) -> Float[Tensor, "*lead d_model"]:
    """The model's final RMSNorm (its weight included) applied to vectors of any leading shape.

    Example:
        >>> final_norm(model, model.W_E[:3]).pow(2).mean(-1)  # unit mean square before the weight
    """
    return model.ln_final(x.reshape(-1, 1, x.shape[-1])).reshape(x.shape)


def read_out(
    model: HookedLlava, x: Float[Tensor, "*lead d_model"], normalize: bool = True
) -> Float[Tensor, "*lead d_vocab"]:
    """Logits of residual vectors: `W_U · ln_final(x)`, or `W_U · x` when `normalize=False`.

    Example:
        >>> read_out(model, model.W_E[:3], normalize=False).shape  # [3, d_vocab]
    """
    h = final_norm(model, x) if normalize else x
    return model.unembed(h.reshape(-1, 1, h.shape[-1])).reshape(*x.shape[:-1], -1)
