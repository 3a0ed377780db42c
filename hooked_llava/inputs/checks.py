"""Input validation: every bad input gets a message saying what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hooked_llava.inputs.llava_inputs import LlavaInputs
    from hooked_llava.model.config import VisionConfig
    from hooked_llava.model.hooked_llava import HookedLlava


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


def image_feature_count(inputs: LlavaInputs, features: list[Tensor], kind: str = "image") -> None:
    """The placeholders of `kind` ("image" or "video") must number exactly the features that replace them."""
    n_tokens = int(inputs.placeholder_mask(kind).sum())
    per_image = [f.shape[0] for f in features]
    if n_tokens != sum(per_image):
        token_id = inputs.image_token_id if kind == "image" else inputs.video_token_id
        raise ValueError(
            f"the prompts hold {n_tokens} {kind} placeholder tokens (id {token_id}) but the "
            f"{len(per_image)} {kind}(s) give {sum(per_image)} features ({', '.join(map(str, per_image))} per {kind}). "
            f"Each `<{kind}>` must be expanded to its {kind}'s number of features: build inputs with `model.prepare` "
            "or the model's processor."
        )


def video_pixels(pixels: Any, cfg: VisionConfig, packing: str) -> None:
    """OneVision's `pixel_values_videos`: `[n_videos, frames, channels, size, size]`."""
    if packing != "onevision":
        raise ValueError(
            "only LLaVA-OneVision models take videos; drop pixel_values_videos (or load a OneVision model)."
        )
    expected = f"[n_videos, frames, {cfg.n_channels}, {cfg.image_size}, {cfg.image_size}]"
    if not isinstance(pixels, Tensor) or not pixels.is_floating_point():
        raise TypeError(f"pixel_values_videos must be a floating-point tensor {expected}; got {type(pixels).__name__}.")
    if pixels.ndim != 5 or tuple(pixels.shape[-3:]) != (cfg.n_channels, cfg.image_size, cfg.image_size):
        raise ValueError(
            f"pixel_values_videos has shape {tuple(pixels.shape)}, but this vision tower expects {expected}. "
            "Resize the frames with the model's processor (`model.prepare(videos=...)`)."
        )


def multi_image(batch_num_images: Any, n_images: int) -> list[bool]:
    """Per image, whether its prompt holds several images (OneVision then packs its base view only).
    None means one image per prompt, as HF assumes."""
    if batch_num_images is None:
        return [False] * n_images
    counts = [int(n) for n in (batch_num_images.tolist() if isinstance(batch_num_images, Tensor) else batch_num_images)]
    if sum(counts) != n_images or min(counts, default=1) < 0:
        raise ValueError(
            f"batch_num_images {counts} must count the images of each prompt and sum to the {n_images} images given."
        )
    return [n != 1 for n in counts for _ in range(n)]


def finite_pixels(pixels: Tensor) -> None:
    """One NaN or inf pixel makes every logit NaN: refuse it before the forward."""
    if bool(pixels.sum().isfinite()):  # one reduction: NaN and inf propagate through the sum
        return
    finite = torch.isfinite(pixels)
    if bool(finite.all()):  # finite values whose sum overflowed
        return
    bad = ~finite.flatten(1).all(1)
    raise ValueError(
        f"pixel_values hold {int((~finite).sum())} non-finite value(s) (NaN or inf), in image(s) "
        f"{bad.nonzero()[:, 0].tolist()}; every logit would be NaN. Check how the images were loaded and "
        "normalised, or build the pixels with `model.prepare(images=...)`."
    )


def token_ids(ids: Tensor, d_vocab: int) -> None:
    """Ids outside the embedding table would fail deep inside `F.embedding` with an opaque IndexError."""
    lo, hi = torch.aminmax(ids)
    if int(lo) >= 0 and int(hi) < d_vocab:
        return
    bad = (ids < 0) | (ids >= d_vocab)
    values = ids[bad].unique().tolist()
    where = [tuple(rc) for rc in bad.nonzero()[:5].tolist()]
    raise ValueError(
        f"input_ids hold {len(values)} id(s) outside this model's vocabulary of {d_vocab} tokens (valid: 0 to "
        f"{d_vocab - 1}): {values[:10]}{' ...' if len(values) > 10 else ''}, first at (row, position) {where}. "
        "Tokenise with this model's tokenizer (`model.to_tokens` or `model.prepare`)."
    )


def attention_mask(mask: Tensor) -> None:
    lo, hi = torch.aminmax(mask)
    if not (float(lo) >= 0 and float(hi) <= 1 and (not mask.is_floating_point() or bool((mask == mask.round()).all()))):
        raise ValueError(
            f"attention_mask must hold only 0 (padding) and 1 (real token); got the values {mask.unique().tolist()}."
        )
    empty = ~mask.any(1)
    if bool(empty.any()):
        raise ValueError(
            f"attention_mask row(s) {empty.nonzero()[:, 0].tolist()} are all zeros: those prompts have no real "
            "token to run on. Set the mask to 1 on each prompt's tokens, or drop the empty rows."
        )


def _tokenizer_image_id(model: HookedLlava) -> int | None:
    processor = model.processor
    tokenizer = getattr(processor, "tokenizer", None)
    token = getattr(processor, "image_token", None)
    if tokenizer is None or not isinstance(token, str):
        return None
    found = tokenizer.convert_tokens_to_ids(token)
    return found if isinstance(found, int) else None


def placeholders(x: LlavaInputs, model: HookedLlava) -> None:
    """Pixels and `<image>` placeholders must come together."""
    n_placeholders = int(x.placeholder_mask("image").sum())
    n_video = int(x.placeholder_mask("video").sum())
    if (x.pixel_values_videos is None) != (n_video == 0):
        raise ValueError(
            f"the input holds {n_video} `<video>` placeholder tokens but pixel_values_videos is "
            f"{'missing' if x.pixel_values_videos is None else 'given'}: videos and their placeholders come together; "
            "build the inputs with `model.prepare(videos=...)`."
        )
    if x.pixel_values is None and n_placeholders:
        raise ValueError(
            f"the input holds {n_placeholders} `<image>` placeholder tokens but no pixel_values were given. "
            "Pass the image(s) with `model.prepare(images=..., prompts=...)` or `pixel_values=`."
        )
    if x.pixel_values is None or n_placeholders:
        return
    looked_for = f"no token is the image placeholder id {x.image_token_id} (the config's image_token_index)"
    tok_id = _tokenizer_image_id(model)
    if tok_id is not None and tok_id != x.image_token_id and bool((x.input_ids == tok_id).any()):
        raise ValueError(
            f"pixel_values were given but {looked_for}. The prompt does hold `<image>`, which this model's "
            f"tokenizer maps to id {tok_id}: the config's image_token_index is probably wrong; set it to {tok_id}."
        )
    raise ValueError(
        f"pixel_values were given but {looked_for}, so the image would be ignored. Put `<image>` in the prompt "
        "(e.g. 'USER: <image>\\n...') or drop the image; if the prompt holds it, check image_token_index."
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
    token_ids(ids, model.cfg.d_vocab)
    attention_mask(x.attention_mask)
    if x.pixel_values is not None and model.vision is not None:
        pixel_values(x.pixel_values, model.vision.cfg, model.W_E.dtype, tiles=model.cfgs.pinpoints is not None)
    placeholders(x, model)


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
