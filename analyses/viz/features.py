"""`feature_explorer`: one SAE (or transcoder) feature over the image patches of several scenes.

For each chosen feature the view shows its activation over every scene's patch grid and text
tokens (one colour scale for all scenes), its top-activating patches and tokens, and, where the
scenes come from the Shapes world, its ground-truth label: the patch attribute (object, colour,
shape, side) it detects most precisely on these scenes, with precision and recall, scored as in
`analyses.sae_groundtruth` (a feature fires where it is active, > 0).

Any object with `encode(x)` (`x`: `[..., d_in]` activations of one hook) works: a SAELens `SAE`
(its hook is `cfg.metadata.hook_name`), a transcoder, or your own; pass `hook=` when the object
does not name its hook. SAELens is not needed. The activations are the model's own at that hook
(no splicing), so they are the feature activations the SAE computes on the unmodified forward.

What it weighs: per feature, the activations at every position of every scene (16 bits), one PNG
per scene and the top list; the Shapes model with 8 features and 6 scenes is about 0.1 MB.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analyses.viz.page import Explorer, encode_array, image_uri
from hooked_llava import HookedLlava


def hook_of(sae: Any, hook: str | None) -> str:
    """The hook the SAE reads: `hook` if given, else `sae.cfg.metadata.hook_name` (SAELens) or `sae.cfg.hook_name`."""
    if hook is not None:
        return hook
    cfg = getattr(sae, "cfg", None)
    for found in (getattr(getattr(cfg, "metadata", None), "hook_name", None), getattr(cfg, "hook_name", None)):
        if isinstance(found, str):
            return found
    raise ValueError(
        f"cannot tell which hook {type(sae).__name__} reads: pass hook='blocks.4.hook_resid_post' (for example)."
    )


@torch.no_grad()
def encode(sae: Any, acts: torch.Tensor) -> torch.Tensor:
    """`sae.encode(acts)` on the SAE's own device and dtype, returned as float32 on the CPU."""
    if not callable(getattr(sae, "encode", None)):
        raise TypeError(f"{type(sae).__name__} has no encode(x): pass a SAELens SAE, a transcoder or an encoder.")
    params = list(sae.parameters()) if hasattr(sae, "parameters") else []
    if params:
        acts = acts.to(params[0].device, params[0].dtype)
    return sae.encode(acts).detach().float().cpu()


def _scene_parts(model: HookedLlava, inputs: Any, row: int) -> dict[str, Any]:
    from analyses.plotting import processed_image

    real = inputs.attention_mask[row].bool().cpu().nonzero()[:, 0].tolist()
    words = model.to_str_tokens(inputs[[row]])
    rc, image = inputs.patch_rc()[row].cpu(), inputs.image_mask[row].cpu()
    return {
        "image": image_uri(processed_image(inputs, row)),
        "positions": real,
        "tokens": [words[p] for p in real],
        "cells": [rc[p].tolist() if image[p] else [-1, -1] for p in real],
    }


def _labels(scenes: Sequence[Any], grid_acts: torch.Tensor, grid: int) -> list[dict[str, Any] | None]:
    """Per feature, its best ground-truth attribute on these scenes (None when they are not Shapes scenes)."""
    from analyses.saes import best_attributes, patch_attributes, precision_recall
    from hooked_llava.shapes import ShapesWorld

    worlds = {getattr(getattr(s, "scene", None), "image_size", None) for s in scenes}
    if len(worlds) != 1 or None in worlds or next(iter(worlds)) % grid:
        return [None] * grid_acts.shape[0]
    size = next(iter(worlds))
    world = ShapesWorld(image_size=size, patch_size=size // grid)
    attrs = patch_attributes(world, [s.scene for s in scenes])  # [scene * cell, attribute]
    fires = grid_acts.flatten(1).T > 0  # [scene * cell, feature]
    table = best_attributes(*precision_recall(fires, attrs), "sae")
    return [
        None if not fires[:, i].any() else {"attribute": r.attribute, "precision": r.precision, "recall": r.recall}
        for i, r in enumerate(table.itertuples())
    ]


def _top(acts: torch.Tensor, scenes: list[dict[str, Any]], k: int) -> list[list[dict[str, Any]]]:
    """Per feature, its `k` largest activations over every real position of every scene."""
    out = []
    for per_feature in acts:  # [scene, pos]
        values, flat = per_feature.flatten().topk(min(k, per_feature.numel()))
        items = []
        for v, f in zip(values.tolist(), flat.tolist()):
            s, i = divmod(f, per_feature.shape[1])
            if i < len(scenes[s]["positions"]) and v > float("-inf"):
                r, c = scenes[s]["cells"][i]
                items.append({"scene": s, "position": scenes[s]["positions"][i], "token": scenes[s]["tokens"][i],
                              "r": r, "c": c, "value": v})  # fmt: skip
        out.append(items)
    return out


def feature_explorer(
    model: HookedLlava,
    sae_or_transcoder: Any,
    scenes: Sequence[Any],
    features: int | Sequence[int] | None = None,
    hook: str | None = None,
    n_features: int = 8,
    k: int = 10,
) -> Explorer:
    """One feature's activation over the patches of several scenes, its top patches and tokens, its label.

    Args:
        model: the model.
        sae_or_transcoder: anything with `encode(x)`; its hook is `hook`, or read from its config (SAELens).
        scenes: examples with `.image` and `.prompt` (Shapes `Example`s: their `.scene` gives the labels).
        features: the feature(s) offered in the selector (default: the `n_features` with the largest
            activation on these scenes' patches).
        hook: the hook whose activations the encoder reads (default: from the SAE's config).
        n_features: how many features to offer when `features` is None.
        k: top activations listed per feature.

    Returns:
        An `Explorer` with a `feature-select`, one `scene-{s}` block per scene holding `patch-{r}-{c}`
        cells (`data-value`: the activation) and `token-{i}` text positions, and the `feature-label`.

    Example:
        >>> feature_explorer(model, sae, [world.example(i, "Colour") for i in range(6)]).save("features.html")
    """
    name = hook_of(sae_or_transcoder, hook)
    if name not in model.hook_dict:
        raise ValueError(f"the model has no hook {name!r}; pass hook= with one of model.hook_dict's names.")
    if not scenes:
        raise ValueError("feature_explorer needs at least one scene.")
    from analyses.patch_maps import to_grid

    inputs = model.prepare(images=[s.image for s in scenes], prompts=[s.prompt for s in scenes])
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=[name])
    latents = encode(sae_or_transcoder, cache[name])  # [scene, pos, d_sae]
    latents = latents.masked_fill(~inputs.attention_mask.bool().cpu()[..., None], 0.0)
    patch_acts = latents.masked_fill(~inputs.image_mask.cpu()[..., None], float("-inf")).amax((0, 1))
    if features is None:
        chosen = patch_acts.topk(min(n_features, latents.shape[-1])).indices.tolist()
    else:
        chosen = [int(features)] if isinstance(features, (int, np.integer)) else [int(f) for f in features]
        if not all(0 <= f < latents.shape[-1] for f in chosen):
            raise IndexError(f"features must lie in 0..{latents.shape[-1] - 1}; got {chosen}.")
    parts = [_scene_parts(model, inputs, row) for row in range(len(scenes))]
    width = max(len(p["positions"]) for p in parts)
    acts = torch.zeros(len(chosen), len(scenes), width)
    for s, p in enumerate(parts):
        acts[:, s, : len(p["positions"])] = latents[s][p["positions"]][:, chosen].T
    grid_acts = torch.stack([to_grid(inputs, latents[..., f]) for f in chosen])  # [feature, scene, grid, grid]
    payload = {
        "features": chosen,
        "hook": name,
        "grid": inputs.grid_size,
        "scenes": parts,
        "acts": encode_array(acts, bits=16, low=min(0.0, float(acts.min())), high=max(float(acts.max()), 1e-12)),
        "labels": _labels(scenes, grid_acts.flatten(2), inputs.grid_size),
        "top": _top(_masked(acts, parts), parts, k),
    }
    return Explorer("features", payload, f"SAE features at {name}")


def _masked(acts: torch.Tensor, parts: list[dict[str, Any]]) -> torch.Tensor:
    """`acts` with the padding after each scene's last position set to -inf (left out of the top list)."""
    out = acts.clone()
    for s, p in enumerate(parts):
        out[:, s, len(p["positions"]) :] = float("-inf")
    return out
