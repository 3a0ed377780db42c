"""Turning images and prompts into `LlavaInputs` with the model's Hugging Face processor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from hooked_llava.inputs import checks
from hooked_llava.inputs.geometry import Box
from hooked_llava.inputs.llava_inputs import LlavaInputs, question_spans
from hooked_llava.inputs.prompts import check_known_words, format_questions
from hooked_llava.model import next as next_

if TYPE_CHECKING:
    from hooked_llava.model.hooked_llava import HookedLlava


def wrap_ids(
    model: HookedLlava, input_ids: Any, pixel_values: Any, attention_mask: Tensor | None, **extra: Any
) -> LlavaInputs:
    """`LlavaInputs` around ids the caller tokenised (HF-style calls end up here)."""
    ids = torch.as_tensor(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(ids.device)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}.")
    vision = model.vision.cfg if model.vision is not None else None
    tiled = model.cfgs.pinpoints is not None
    if pixel_values is not None and vision is not None:
        checks.pixel_values(pixel_values, vision, model.W_E.dtype, tiles=tiled)
        if tiled:
            sizes = checks.image_sizes(extra.get("image_sizes"), pixel_values.shape[0])
            layouts = model.layouts(sizes)
            extra.update(image_sizes=sizes, token_tables=[next_.token_table(lay, vision.patch_size) for lay in layouts])
    return LlavaInputs(
        input_ids=ids,
        attention_mask=mask.long(),
        pixel_values=pixel_values,
        image_token_id=model.cfg.image_token_id,
        tokens_per_image=vision.n_image_tokens if vision else 0,
        grid_size=vision.grid_size if vision else 0,
        has_cls=bool(vision and vision.select_strategy == "full"),
        **extra,
    )


def _images(images: Any, prompts: list[str], image_token: str) -> list[Any] | None:
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    n_expected = sum(p.count(image_token) for p in prompts)
    n_given = 0 if images is None else len(images)
    if n_expected != n_given:
        raise ValueError(
            f"the prompts contain {n_expected} {image_token!r} placeholder(s) but {n_given} image(s) were given; "
            f"put one {image_token!r} in the prompt for each image."
        )
    return [_to_byte_range(im, i) for i, im in enumerate(images)] if images else None


def _to_byte_range(image: Any, index: int) -> Any:
    """An image on the 0-255 scale the HF image processor assumes (it multiplies by 1/255).

    16-bit images (PIL modes "I;16*", PIL "I" with values above 255, uint16 arrays) are scaled by
    1/257 instead of being clipped to white; float arrays, tensors and PIL "F" images whose values all
    lie in [0, 1] are taken as already rescaled and multiplied by 255, so they are not rescaled twice.
    Float images outside [0, 255] or with NaN/inf (already normalised?) are refused.
    """
    mode = getattr(image, "mode", None)  # PIL images only (tensors have a `mode` method)
    if not isinstance(mode, str):
        return _array_to_byte_range(image, index)
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    from PIL import Image

    values = np.asarray(image)
    if mode == "I" and values.max(initial=0) <= 255 and values.min(initial=0) >= 0:
        return image.convert("L")
    if mode != "F" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
        raise ValueError(f"image {index} (PIL mode {mode!r}) holds values outside 0-65535; convert it to 8 bits.")
    scaled = _array_to_byte_range(values.astype(np.float64) / (1 if mode == "F" else 257), index)
    return Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")


def _array_to_byte_range(image: Any, index: int) -> Any:
    dtype = getattr(image, "dtype", None)
    if dtype in (np.uint16, torch.uint16):
        return image / 257
    floating = image.is_floating_point() if isinstance(image, Tensor) else np.issubdtype(dtype, np.floating)
    if not floating:
        return image
    lo, hi = float(image.min()), float(image.max())
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 255:
        raise ValueError(
            f"image {index} is a float image with values from {lo} to {hi}; expected raw pixels in [0, 1] or "
            "[0, 255] (no NaN or inf). If it is already normalised, pass it as pixel_values= instead."
        )
    return image * 255 if hi <= 1 else image


def _no_images(model: HookedLlava, images: Any) -> None:
    """A text-only model takes no images: say so instead of failing inside the tokenizer."""
    if images is not None:
        raise ValueError(
            f"this is a text-only model ({model.cfg.original_architecture}, no vision tower) and takes no images: "
            "leave images out (describe the scene in the prompt), or load a LLaVA checkpoint."
        )


def _question_mask(
    offsets: Tensor, prompts: list[str], spans: list[tuple[int, int] | None], image_token: str, counts: list[int]
) -> Tensor:
    """Tokens whose characters fall inside the question span (offsets index the expanded text)."""
    mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
    images = iter(counts)  # placeholder tokens of each image, in prompt order
    for row, (prompt, span) in enumerate(zip(prompts, spans, strict=True)):
        n_before = prompt[: span[0]].count(image_token) if span else 0
        expanded = [next(images) for _ in range(prompt.count(image_token))]
        if span is None:
            continue
        shift = sum(n - 1 for n in expanded[:n_before]) * len(image_token)
        start, end = span[0] + shift, span[1] + shift
        s, e = offsets[row, :, 0], offsets[row, :, 1]
        mask[row] = (s >= start) & (e <= end) & (e > s)
    return mask


def _crop(image_processor: Any) -> tuple[int, int] | None:
    size = getattr(image_processor, "size", None) or {}
    crop = getattr(image_processor, "crop_size", None) or {}
    shortest = size.get("shortest_edge") or size.get("height")
    side = crop.get("height") if getattr(image_processor, "do_center_crop", False) else shortest
    return (int(shortest), int(side)) if shortest and side else None


def _tokenize(processor: Any, images: list[Any] | None, prompts: list[str], spans: list, padding_side: str) -> Any:
    """The processor's (or, for a text-only model, the tokenizer's) encoding, with offsets; unknown words raise."""
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    kwargs = {"return_tensors": "pt", "padding": True, "return_offsets_mapping": True}
    try:
        if tokenizer is processor:
            out = tokenizer(prompts, **kwargs)
        else:
            out = processor(images=images, text=prompts, **kwargs)
    finally:
        tokenizer.padding_side = side
    check_known_words(tokenizer, prompts, spans, out["input_ids"], out["attention_mask"])
    return out


def encode(
    model: HookedLlava,
    images: Any,
    prompts: list[str],
    spans: list[tuple[int, int] | None],
    boxes: Any,
    padding_side: str,
) -> LlavaInputs:
    """Run the HF processor on images and prompts and record each position's role."""
    processor = model.processor
    if processor is None:
        raise ValueError(
            "this model has no processor: load it from a directory that holds the processor files, pass "
            "`processor=` to from_pretrained/from_hf, or tokenise yourself and call prepare(input_ids=...)."
        )
    image_token = getattr(processor, "image_token", None) or "<image>"
    if model.vision is None:
        _no_images(model, images)
    image_list = None if model.vision is None else _images(images, prompts, image_token)
    if boxes is not None and len(boxes) != len(prompts):
        raise ValueError(f"boxes must hold one list of boxes per prompt: got {len(boxes)} for {len(prompts)} prompts.")
    out = _tokenize(processor, image_list, prompts, spans, padding_side)
    sizes = [(im.height, im.width) if hasattr(im, "height") else tuple(im.shape[-2:]) for im in image_list or []]
    if "image_sizes" in out:  # LLaVA-NeXT processors report them
        sizes = [tuple(int(v) for v in s) for s in out["image_sizes"].tolist()]
    counts = [model.vision.cfg.n_image_tokens if model.vision is not None else 0] * len(sizes)
    if model.cfgs.pinpoints is not None:  # LLaVA-NeXT: the count depends on each image's size
        counts = [lay.n_tokens for lay in model.layouts(sizes)]
    if model.vision is None:  # a text-only model: a placeholder in its prompt stays one token
        counts = [1] * sum(p.count(image_token) for p in prompts)
    question = _question_mask(out["offset_mapping"], prompts, spans, image_token, counts)
    return wrap_ids(
        model,
        out["input_ids"],
        out.get("pixel_values"),
        out["attention_mask"],
        question_mask=question,
        boxes=boxes,
        image_sizes=sizes or None,
        crop=_crop(getattr(processor, "image_processor", None)),
        texts=prompts,
    )


def prepare(
    model: HookedLlava,
    images: Any = None,
    prompts: str | list[str] | None = None,
    *,
    questions: str | list[str] | None = None,
    template: str | None = None,
    boxes: list[list[Box]] | None = None,
    input_ids: Tensor | None = None,
    pixel_values: Any = None,
    attention_mask: Tensor | None = None,
    image_sizes: Any = None,
    padding_side: str = "left",
) -> LlavaInputs:
    """Build `LlavaInputs` with the model's HF processor, or wrap ids the caller tokenised.

    Either give `images` with `prompts` (full prompts containing `<image>`) or `questions`, or
    give `input_ids` (and `pixel_values`) directly. Questions are formatted with the model's chat
    template (one user turn holding the image and the question, then the assistant's turn as the
    checkpoint was trained to start it), or with `template` (a format string with `{question}`)
    when given or when the model has no chat template (then `LLAVA15_TEMPLATE`, or
    `"USER: {question}\\nASSISTANT:"` without images). Text-only models take no images. A word
    the tokenizer does not know is a ValueError that names it.

    Example:
        >>> inputs = model.prepare(images=[img], questions=["What is the color of the circle?"])
        >>> inputs.positions("question")
    """
    if input_ids is not None:
        if images is not None or prompts is not None or questions is not None:
            raise ValueError("give either input_ids (tokenised yourself) or images/prompts, not both.")
        extra = {} if image_sizes is None else {"image_sizes": image_sizes}
        return wrap_ids(model, input_ids, pixel_values, attention_mask, **extra)
    if questions is not None:
        questions = [questions] if isinstance(questions, str) else list(questions)
        if prompts is not None:
            raise ValueError("give either prompts or questions, not both.")
        n_images = 0 if images is None else len(images) if isinstance(images, (list, tuple)) else 1
        image_token = getattr(model.processor, "image_token", None) or "<image>"
        prompts, spans = format_questions(model.processor, questions, n_images, template, image_token)
    elif prompts is not None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        spans = question_spans(prompts)
    else:
        raise ValueError("nothing to prepare: give prompts (or questions) and images, or input_ids.")
    return encode(model, images, prompts, spans, boxes, padding_side)
