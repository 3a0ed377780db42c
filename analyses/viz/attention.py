"""`attention_explorer`: click a token, see where it looks in the image (and in the text).

The view shows the image with its patch grid and the token sequence (image positions live in the
image, text positions are tokens). Clicking a token makes it the query: its attention over the
patches and over the text, at the chosen layer and head (or the mean over heads, computed here in
Python). Clicking a patch shows what attends to it. The language model (`blocks.{l}.attn.hook_pattern`)
and the vision tower (`vision.blocks.{l}.attn.hook_pattern`, `tower="vision"`) are both supported.

What it weighs: the view ships the attention rows of the selectable queries only (by default the
text positions for the language model, every position for the vision tower), for every layer and
for each head plus the mean, as square roots quantised over [0, 1] (fine steps for small weights:
16 bits while that stays under 8 MB of codes, else 8 bits), deflated and base64-encoded. On the
Shapes model (85 positions, 21 text queries, 8 layers x 8 heads) the page weighs about 0.3 MB. At
LLaVA-1.5-7B scale (576 image tokens, about 620 positions, 45 text queries, 32 layers x 32 heads)
it is 8-bit and weighs at most 39 MB whatever the pattern (base64 of incompressible codes:
4/3 x 32 x 33 x 45 x 620 bytes); a fake 7B pattern with an attention sink on BOS, as LLaVA has,
deflates to about 6 MB (`tests/test_viz.py` builds it). `layers=` and `queries=` cut it further:
one layer of that fake weighs 0.5 MB (16-bit).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from analyses.viz.grid import ImageGrid, image_grid
from analyses.viz.page import Explorer, encode_array, image_uri
from hooked_llava import HookedLlava, LlavaInputs

BUDGET_16_BIT = 8_000_000  # bytes of 16-bit codes (before deflate) up to which 16 bits are kept


def attention_payload(
    patterns: Float[Tensor, "layer head query key"], bits: int | None = None
) -> tuple[dict[str, Any], Tensor]:
    """The encoded attention rows the view ships: the mean over heads first, then each head.

    Args:
        patterns: the selected query rows of every layer's `hook_pattern`.
        bits: 8 or 16; default 16 while the 16-bit codes stay under `BUDGET_16_BIT` bytes, else 8.

    Returns:
        The `encode_array` dict of the `[layer, 1 + head, query, key]` values (index 0 of the head
        axis is the mean over heads), and those values as a float tensor.
    """
    values = torch.cat([patterns.double().mean(1, keepdim=True).float(), patterns.float()], dim=1)
    if bits is None:
        bits = 16 if values.numel() * 2 <= BUDGET_16_BIT else 8
    return encode_array(values, bits=bits, low=0.0, high=1.0, gamma=2.0), values


def build_attention_view(
    patterns: Float[Tensor, "layer head query key"],
    tokens: Sequence[str],
    cells: Sequence[tuple[int, int]],
    queries: Sequence[int],
    image: np.ndarray,
    grid: int,
    layers: Sequence[int],
    names: str = "blocks.{l}.attn.hook_pattern",
    bits: int | None = None,
    title: str = "",
) -> Explorer:
    """The explorer from its parts (no model needed: the tests build a 7B-sized one this way).

    Args:
        patterns: attention of each selectable query (in `queries` order) over every position.
        tokens: the text of every position (`key` axis).
        cells: `(row, col)` of every position in the patch grid, `(-1, -1)` for text positions.
        queries: the positions (indices into `tokens`) whose rows `patterns` holds.
        image: the image as the vision tower saw it, `[h, w, 3]` in [0, 1].
        grid: side of the patch grid.
        layers: the layer of each entry of `patterns`' first axis.
        names: the hook name pattern shown with the layer.
        bits: quantisation (see `attention_payload`).
        title: a heading.
    """
    n_layer, n_head, n_query, n_key = patterns.shape
    if len(tokens) != n_key or len(cells) != n_key or len(queries) != n_query or len(layers) != n_layer:
        raise ValueError(
            f"attention view parts disagree: patterns {tuple(patterns.shape)} [layer, head, query, key], "
            f"{len(tokens)} tokens, {len(cells)} cells, {len(queries)} queries, {len(layers)} layers."
        )
    data, _ = attention_payload(patterns, bits)
    payload = {
        "tokens": list(tokens),
        "cells": [list(c) for c in cells],
        "positions": list(range(n_key)),
        "queries": [int(q) for q in queries],
        "layers": [int(x) for x in layers],
        "heads": ["mean", *range(n_head)],
        "hook": names,
        "grid": int(grid),
        "image": image_uri(image),
        "attention": data,
    }
    return Explorer("attention", payload, title)


def _pattern_names(model: HookedLlava, tower: str) -> list[str]:
    prefix = {"language": "", "vision": "vision."}.get(tower)
    if prefix is None:
        raise ValueError(f"tower must be 'language' or 'vision', got {tower!r}.")
    names, layer = [], 0
    while f"{prefix}blocks.{layer}.attn.hook_pattern" in model.hook_dict:
        names.append(f"{prefix}blocks.{layer}.attn.hook_pattern")
        layer += 1
    if not names:
        raise ValueError(f"the model has no {tower} attention patterns ({prefix}blocks.0.attn.hook_pattern).")
    return names


@torch.no_grad()
def _collect(
    model: HookedLlava, inputs: LlavaInputs, names: list[str], index: int, queries: Tensor, keys: Tensor, cache: Any
) -> Tensor:
    """`[layer, head, query, key]` rows of the patterns, from the cache or a hooked forward."""
    take = lambda pattern: pattern[index][:, queries][:, :, keys].detach().float().cpu()  # noqa: E731
    if cache is not None:
        missing = [n for n in names if n not in cache]
        if missing:
            raise KeyError(
                f"the cache lacks {missing[0]} (and {len(missing) - 1} more); run_with_cache without a filter."
            )
        return torch.stack([take(cache[n]) for n in names])
    kept: dict[str, Tensor] = {}

    def keep(pattern: Tensor, hook: Any) -> Tensor:
        kept[hook.name] = take(pattern)
        return pattern

    model.run_with_hooks(inputs, fwd_hooks=[(n, keep) for n in names])
    return torch.stack([kept[n] for n in names])


def _language_parts(model: HookedLlava, inputs: LlavaInputs, row: int, queries: Any, drawn: ImageGrid):
    hidden = set(drawn.hidden)
    real = inputs.attention_mask[row].bool().cpu()
    keys = torch.tensor([p for p in real.nonzero()[:, 0].tolist() if p not in hidden], dtype=torch.long)
    words = model.to_str_tokens(inputs[[row]])
    image = inputs.image_mask[row].cpu()
    tokens = [words[p] for p in keys.tolist()]
    cells = [drawn.cells.get(p, (-1, -1)) for p in keys.tolist()]
    if queries is None or queries == "text":
        chosen = [i for i, p in enumerate(keys.tolist()) if not image[p]]
    elif queries == "all":
        chosen = list(range(len(keys)))
    else:
        where = {p: i for i, p in enumerate(keys.tolist())}
        bad = [q for q in queries if q not in where]
        if bad:
            raise ValueError(
                f"queries {bad} are not real positions of row {row} drawn in the view "
                f"(0..{inputs.input_ids.shape[1] - 1}; tiles and newline tokens are left out)."
            )
        chosen = [where[int(q)] for q in queries]
    return keys, tokens, cells, chosen, row, drawn.grid


def _vision_parts(model: HookedLlava, inputs: LlavaInputs, row: int, queries: Any, drawn: ImageGrid):
    cfg = model.vision.cfg
    grid = cfg.image_size // cfg.patch_size
    n, cls = cfg.n_ctx, cfg.n_ctx - grid * grid  # CLIP puts CLS first; SigLIP has none
    tokens = ["<cls>"] * cls + [f"<img {p // grid},{p % grid}>" for p in range(grid * grid)]
    cells = [(-1, -1)] * cls + [(p // grid, p % grid) for p in range(grid * grid)]
    if queries in (None, "all"):
        chosen = list(range(n))
    elif queries == "text":
        raise ValueError("the vision tower has no text positions: use queries='all' or a list of positions.")
    else:
        chosen = [int(q) for q in queries]
        if not all(0 <= q < n for q in chosen):
            raise ValueError(f"vision queries must lie in 0..{n - 1}; got {chosen}.")
    return torch.arange(n), tokens, cells, chosen, drawn.vision_index, grid


def attention_explorer(
    model: HookedLlava,
    inputs: LlavaInputs,
    cache: Any = None,
    tower: str = "language",
    row: int = 0,
    layers: Sequence[int] | None = None,
    queries: str | Sequence[int] | None = None,
    bits: int | None = None,
) -> Explorer:
    """Click a token to see its attention over the image patches and the text; click a patch to see
    what attends to it. Layer and head selectors (or the mean over heads), a colour scale with its range
    and the exact value on hover.

    Args:
        model: the model.
        inputs: prepared inputs with an image in row `row` (tiled inputs: the view draws the base view of
            the row's first image and leaves out its tile and newline tokens, see `analyses.viz.grid`).
        cache: an `ActivationCache` holding the patterns (default: a hooked forward keeps only the rows shown).
        tower: "language" (`blocks.{l}.attn.hook_pattern`) or "vision" (`vision.blocks.{l}.attn.hook_pattern`).
        row: the batch row shown.
        layers: which layers (default all).
        queries: the selectable query positions: "text" (the language model's default: every real text
            position), "all" (also each image position; the vision tower's default), or a list of positions.
        bits: 8 or 16 (default: 16 while the payload is small, see `attention_payload`).

    Returns:
        An `Explorer`: `.save("attention.html")`, `.to_html()`, or display it in a notebook. Its DOM has
        `data-testid`s `token-{i}` (text positions, `i` in the merged sequence), `patch-{r}-{c}` (with
        `data-value`, the weight shown), `layer-select`, `head-select` and `patch-mode`.

    Example:
        >>> attention_explorer(model, inputs).save("attention.html")
    """
    names = _pattern_names(model, tower)
    chosen_layers = list(range(len(names))) if layers is None else [int(x) for x in layers]
    bad = [x for x in chosen_layers if not 0 <= x < len(names)]
    if bad:
        raise ValueError(f"layers {bad} are out of range: the {tower} tower has layers 0..{len(names) - 1}.")
    if not 0 <= row < len(inputs):
        raise IndexError(f"row {row} is out of range for a batch of {len(inputs)}.")
    drawn = image_grid(model, inputs, row)
    parts = _language_parts if tower == "language" else _vision_parts
    keys, tokens, cells, chosen, index, grid = parts(model, inputs, row, queries, drawn)
    patterns = _collect(model, inputs, [names[x] for x in chosen_layers], index, keys[chosen], keys, cache)
    hook = ("vision." if tower == "vision" else "") + "blocks.{l}.attn.hook_pattern"
    left_out = drawn.note() if tower == "language" else ""
    title = f"attention explorer ({tower} tower{'; ' + left_out if left_out else ''})"
    view = build_attention_view(patterns, tokens, cells, chosen, drawn.image, grid, chosen_layers, hook, bits, title)
    view.payload["positions"] = keys.tolist()  # each key's position in the merged (or vision) sequence
    return view
