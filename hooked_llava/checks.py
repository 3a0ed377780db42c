"""Input validation: every bad input gets a message saying what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .config import VisionConfig
    from .inputs import LlavaInputs
    from .model import HookedLlava


def hook_name(name: str, hook_dict: Mapping[str, Any]) -> None:
    """Raise a KeyError naming the closest valid hook names for an unknown one."""
    if name in hook_dict:
        return
    close = difflib.get_close_matches(name, list(hook_dict), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else " See `model.hook_names` for all of them."
    raise KeyError(f"unknown hook name {name!r}.{hint}")


def names_filter(filter: Any, hook_dict: Mapping[str, Any]) -> None:
    if isinstance(filter, str):
        hook_name(filter, hook_dict)
    elif isinstance(filter, (list, tuple)):
        for name in filter:
            hook_name(name, hook_dict)


def pixel_values(pixels: Any, cfg: VisionConfig, dtype: torch.dtype, tiles: bool = False) -> None:
    tile = "n_tiles, " if tiles else ""
    expected = f"[n_images, {tile}{cfg.n_channels}, {cfg.image_size}, {cfg.image_size}]"
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixel_values must be a tensor {expected}, got {type(pixels).__name__}.")
    if not pixels.is_floating_point():
        raise TypeError(
            f"pixel_values must be floating point (normalised by the image processor), got {pixels.dtype}. "
            "Use `model.prepare(images=...)` or the model's processor to make them."
        )
    ndim = 5 if tiles else 4
    if tuple(pixels.shape[-3:]) != (cfg.n_channels, cfg.image_size, cfg.image_size) or pixels.ndim != ndim:
        raise ValueError(
            f"pixel_values has shape {tuple(pixels.shape)}, but this vision tower expects {expected}. "
            "Resize and crop images with the model's processor (`model.prepare`)."
        )


def image_feature_count(inputs: LlavaInputs, features: list[Tensor]) -> None:
    n_tokens = int(inputs.image_mask.sum())
    per_image = [f.shape[0] for f in features]
    if n_tokens != sum(per_image):
        raise ValueError(
            f"the prompts hold {n_tokens} image placeholder tokens but the {len(per_image)} image(s) give "
            f"{sum(per_image)} features ({', '.join(map(str, per_image))} per image). Each `<image>` must be "
            "expanded to its image's number of features: build inputs with `model.prepare` or the model's processor."
        )


def inputs(x: LlavaInputs, model: HookedLlava) -> None:
    ids = x.input_ids
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, pos], got shape {tuple(ids.shape)}.")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"empty batch: input_ids has shape {tuple(ids.shape)}; give at least one non-empty prompt.")
    if ids.shape[1] > model.cfg.n_ctx:
        raise ValueError(
            f"sequence of {ids.shape[1]} tokens exceeds the model's context length of {model.cfg.n_ctx}; "
            "shorten the prompt."
        )
    if x.pixel_values is not None and model.vision is not None:
        pixel_values(x.pixel_values, model.vision.cfg, model.w_e.dtype, tiles=model.cfgs.pinpoints is not None)
    n_placeholders = int(x.image_mask.sum())
    if x.pixel_values is None and n_placeholders:
        raise ValueError(
            f"the input holds {n_placeholders} `<image>` placeholder tokens but no pixel_values were given. "
            "Pass the image(s) with `model.prepare(images=..., prompts=...)` or `pixel_values=`."
        )
    if x.pixel_values is not None and not n_placeholders:
        raise ValueError(
            "pixel_values were given but the input has no `<image>` placeholder tokens, so the image would be "
            "ignored. Put `<image>` in the prompt (e.g. 'USER: <image>\\n...') or drop the image."
        )


def image_sizes(sizes: Any, n_images: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT needs each image's original `(height, width)` to tile and unpad it."""
    if sizes is None:
        raise ValueError(
            "LLaVA-NeXT inputs need `image_sizes` (each image's original (height, width)); "
            "`model.prepare` records them, or pass the processor's `image_sizes=`."
        )
    sizes = [tuple(int(v) for v in s) for s in (sizes.tolist() if isinstance(sizes, Tensor) else sizes)]
    if len(sizes) != n_images:
        raise ValueError(f"got {len(sizes)} image_sizes for {n_images} images; give one (height, width) per image.")
    return sizes
