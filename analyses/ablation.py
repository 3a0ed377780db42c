"""Head ablation: zero- or mean-ablate attention heads through `hook_z`, and scan every head.

A head's `z` (`[batch, pos, head, d_head]`, the attention-weighted values before `W_O`) is
replaced, so the head writes nothing (zero) or its average output (mean) to the residual
stream. `head_ablation_scan` ablates each head in turn; heads of one layer run together as
batch rows, starting from the cached residual before that layer.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from analyses import ranges
from hooked_llava import HookedLlava, LlavaInputs

Head = tuple[int, int] | str
Method = Literal["zero", "mean"]
Metric = Callable[[Tensor], Tensor]


def parse_heads(heads: Head | Sequence[Head], n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """Heads as `(layer, head)` pairs or study A's names ("22_27"), grouped by layer. Negative
    indices count from the end (`(-1, 0)` is head 0 of the last layer); out-of-range ones raise.

    Example:
        >>> parse_heads(["1_2", (0, 3)], n_layers=3, n_heads=4)
        {1: [2], 0: [3]}
    """
    items = [heads] if isinstance(heads, str) or (isinstance(heads, tuple) and isinstance(heads[0], int)) else heads
    by_layer: dict[int, list[int]] = {}
    for item in items:
        layer, head = (int(p) for p in item.split("_")) if isinstance(item, str) else (int(item[0]), int(item[1]))
        try:
            layer, head = ranges.index(layer, n_layers, "layer"), ranges.index(head, n_heads, "head")
        except ranges.OutOfRange as error:
            raise ranges.OutOfRange(f"head {item!r}: {error}") from None
        by_layer.setdefault(layer, []).append(head)
    return by_layer


def head_means(
    model: HookedLlava, reference: LlavaInputs, layers: Sequence[int], per_position: bool = False
) -> dict[int, Tensor]:
    """Mean `z` of every head of `layers` over a reference batch, padding excluded.

    Args:
        model: the model.
        reference: the batch to average over.
        layers: the layers wanted.
        per_position: average over rows only, one vector per position (`[pos, head, d_head]`;
            the ablated inputs must then have the reference's length and layout), instead of
            over rows and positions (`[1, head, d_head]`).

    Example:
        >>> head_means(model, inputs, [0])[0].shape  # [1, n_heads, d_head]
    """
    names = [f"blocks.{layer}.attn.hook_z" for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(reference, names_filter=names, return_type=None)
    weight = reference.attention_mask.to(cache[names[0]].device, cache[names[0]].dtype)[:, :, None, None]
    dims = (0,) if per_position else (0, 1)
    count = weight.sum(dims).clamp_min(1)
    means = {layer: (cache[name] * weight).sum(dims) / count for layer, name in zip(layers, names, strict=True)}
    return {layer: m if per_position else m[None] for layer, m in means.items()}


def replace_heads(
    z: Float[Tensor, "batch pos head d_head"], hook: Any, heads: list[int], values: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Hook on `hook_z`: set `z[:, :, heads]` to `values` (`[pos or 1, len(heads), d_head]`).

    Example:
        >>> hook = partial(replace_heads, heads=[2], values=torch.zeros(1, 1, model.cfg.d_head))
        >>> logits = model.run_with_hooks(inputs, fwd_hooks=[("blocks.1.attn.hook_z", hook)])
    """
    index = torch.tensor(heads, device=z.device)
    return z.index_copy(2, index, values.to(z).expand(z.shape[0], z.shape[1], len(heads), z.shape[3]))


def _values(
    model: HookedLlava,
    inputs: LlavaInputs,
    layers: list[int],
    method: Method,
    reference: LlavaInputs | None,
    per_position: bool,
) -> dict[int, Tensor]:
    """Replacement `z` per layer: `[pos or 1, n_heads, d_head]` covering all heads of the layer."""
    if method == "mean":
        means = head_means(model, inputs if reference is None else reference, layers, per_position)
        if per_position and any(m.shape[0] != inputs.shape[1] for m in means.values()):
            raise ValueError("per-position means need a reference of the ablated inputs' length and layout.")
        return means
    if method != "zero":
        raise ValueError(f"method must be 'zero' or 'mean', got {method!r}.")
    zeros = torch.zeros(1, model.cfg.n_heads, model.cfg.d_head, device=inputs.input_ids.device)
    return dict.fromkeys(layers, zeros)


@torch.no_grad()
def ablate_heads(
    model: HookedLlava,
    inputs: LlavaInputs,
    heads: Head | Sequence[Head],
    method: Method = "zero",
    reference: LlavaInputs | None = None,
    per_position: bool = False,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits with the given heads ablated together (computed without gradients, as the other analyses).

    Args:
        model: the model.
        inputs: the prepared batch.
        heads: `(layer, head)` pairs or names like "22_27".
        method: "zero" sets the head's `z` to 0 (its output is then exactly nothing: the model
            has no `W_O` bias per head); "mean" sets it to its mean over `reference`.
        reference: the batch for the means (default: `inputs`).
        per_position: mean per position over rows (needs a reference of the same layout) rather
            than over rows and all real positions (the default).

    Example:
        >>> logits = ablate_heads(model, inputs, ["1_2", (0, 3)], method="mean")
    """
    layer_heads = parse_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
    values = _values(model, inputs, list(layer_heads), method, reference, per_position)
    hooks = [
        (f"blocks.{layer}.attn.hook_z", partial(replace_heads, heads=hs, values=values[layer][:, hs]))
        for layer, hs in layer_heads.items()
    ]
    return model.run_with_hooks(inputs, fwd_hooks=hooks)


def _replace_head_per_copy(
    z: Float[Tensor, "batch pos head d_head"], hook: Any, heads: list[int], values: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Hook on `hook_z` of a batch made of `len(heads)` copies of the inputs: copy i has head
    `heads[i]` replaced by `values[:, heads[i]]` (`values`: `[pos or 1, n_heads, d_head]`)."""
    z = z.unflatten(0, (len(heads), -1)).clone()  # [replica, batch, pos, head, d_head]
    replica, index = torch.arange(len(heads), device=z.device), torch.tensor(heads, device=z.device)
    z[replica, :, :, index] = values.to(z)[:, index].transpose(0, 1)[:, None]
    return z.flatten(0, 1)


def head_ablation_scan(
    model: HookedLlava,
    inputs: LlavaInputs,
    metric: Metric,
    method: Method = "zero",
    reference: LlavaInputs | None = None,
    per_position: bool = False,
    heads_per_batch: int = 8,
    progress: bool = True,
) -> Float[Tensor, "n_layers n_heads *metric"]:
    """The metric with each head ablated alone, for every head.

    Heads of one layer are batched (`heads_per_batch` copies of the inputs per forward) and
    start from the cached residual before their layer, so the vision tower and earlier layers
    run once. Other arguments are those of `ablate_heads`.

    Args:
        metric: logits `[batch, pos, d_vocab]` → a scalar or a `[batch]` tensor (any shape is kept).

    Returns:
        `[n_layers, n_heads]`, or `[n_layers, n_heads, *metric_shape]` for a non-scalar metric.

    Example:
        >>> answer = model.to_single_token("red")
        >>> scores = head_ablation_scan(model, inputs, lambda lg: lg[:, -1, answer].mean())
    """
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads_per_batch = ranges.count(heads_per_batch, "heads_per_batch")
    values = _values(model, inputs, list(range(n_layers)), method, reference, per_position)
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=names, return_type=None)
    jobs = [
        (layer, list(range(h, min(h + heads_per_batch, n_heads))))
        for layer in range(n_layers)
        for h in range(0, n_heads, heads_per_batch)
    ]
    results = []
    for layer, heads in tqdm(jobs, disable=not progress, desc="head ablation"):
        rows = inputs[list(range(len(inputs))) * len(heads)]
        hook = partial(_replace_head_per_copy, heads=heads, values=values[layer])
        with torch.no_grad(), model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook)]):
            logits = model(rows, start_at_layer=layer, residual=cache[names[layer]].repeat(len(heads), 1, 1))
        results += [torch.as_tensor(metric(chunk)) for chunk in logits.split(len(inputs))]
    out = torch.stack(results)
    return out.reshape(n_layers, n_heads, *out.shape[1:])
