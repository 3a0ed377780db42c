"""Turning images and prompts into `LlavaInputs` with the model's Hugging Face processor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hooked_llava.inputs import checks
from hooked_llava.inputs.geometry import Box
from hooked_llava.inputs.images import to_byte_range
from hooked_llava.inputs.llava_inputs import LlavaInputs, question_spans
from hooked_llava.inputs.onevision_prompts import onevision_request
from hooked_llava.inputs.prompts import check_known_words, format_questions
from hooked_llava.model import next as next_
from hooked_llava.model import onevision

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
    video_sizes = extra.pop("video_sizes", None)
    if pixel_values is not None and vision is not None:
        checks.pixel_values(pixel_values, vision, model.W_E.dtype, tiles=tiled)
        if tiled:
            sizes = checks.image_sizes(extra.get("image_sizes"), pixel_values.shape[0])
            counts = extra.get("batch_num_images")
            if counts is not None:
                counts = [int(n) for n in (counts.tolist() if isinstance(counts, Tensor) else counts)]
                extra["batch_num_images"] = counts
            layouts = model.layouts(sizes, counts)
            table = next_.token_table if model.cfgs.packing == "next" else onevision.token_table
            extra.update(image_sizes=sizes, token_tables=[table(lay, vision.patch_size) for lay in layouts])
    if model.cfgs.packing == "onevision":
        extra["video_token_id"] = model.cfgs.video_token_id
        videos = extra.get("pixel_values_videos")
        if videos is not None and vision is not None:
            checks.video_pixels(videos, vision, "onevision")
            sizes = video_sizes or [(vision.image_size, vision.image_size)] * videos.shape[0]
            tables = [onevision.video_table(videos.shape[1], vision.grid_size, tuple(s)) for s in sizes]
            extra["token_tables"] = _in_order(ids, mask, model, extra.get("token_tables") or [], tables)
    return LlavaInputs(
        input_ids=ids,
        attention_mask=mask.long(),
        pixel_values=pixel_values,
        image_token_id=model.cfg.image_token_id,
        tokens_per_image=vision.n_image_tokens if vision else 0,
        grid_size=vision.grid_size if vision else 0,
        has_cls=bool(vision and vision.has_cls and vision.select_strategy == "full"),
        skips_first_patch=bool(vision and not vision.has_cls and vision.select_strategy == "default"),
        **extra,
    )


def _in_order(ids: Tensor, mask: Tensor, model: HookedLlava, images: list, videos: list) -> list:
    """Image and video token tables in the order their placeholders appear (batch row, then position)."""
    image_id, video_id = model.cfg.image_token_id, model.cfgs.video_token_id
    real = mask.bool()
    kinds = ids[real & ((ids == image_id) | (ids == video_id))].tolist()
    queues = {image_id: iter(images), video_id: iter(videos)}
    tables, i = [], 0
    while i < len(kinds):
        table = next(queues[kinds[i]], None)
        if table is None:
            raise ValueError("the prompts hold more image or video placeholders than the images and videos given.")
        tables.append(table)
        i += len(table)
    return tables


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
    return [to_byte_range(im, i) for i, im in enumerate(images)] if images else None


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


def _squashes(image_processor: Any) -> bool:
    """A processor that resizes straight to `height × width` (SigLIP's) rather than by the shortest edge."""
    size = getattr(image_processor, "size", None) or {}
    return bool(size.get("height") and size.get("width")) and not getattr(image_processor, "do_center_crop", False)


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
    # OneVision: `<video>` placeholders arrive expanded (see `onevision_prompts`); the processor must not count them.
    video_token = getattr(processor, "video_token", None) if tokenizer is not processor else None
    if video_token is not None:
        processor.video_token = None
    try:
        if tokenizer is processor:
            out = tokenizer(prompts, **kwargs)
        else:
            out = processor(images=images, text=prompts, **kwargs)
    finally:
        tokenizer.padding_side = side
        if video_token is not None:
            processor.video_token = video_token
    check_known_words(tokenizer, prompts, spans, out["input_ids"], out["attention_mask"])
    return out


def encode(
    model: HookedLlava,
    images: Any,
    prompts: list[str],
    spans: list[tuple[int, int] | None],
    boxes: Any,
    padding_side: str,
    videos: dict[str, Any] | None = None,
) -> LlavaInputs:
    """Run the HF processor on images and prompts and record each position's role (`videos`: OneVision's
    `pixel_values_videos` and `video_sizes`, their placeholders already expanded in the prompts)."""
    processor = model.processor
    if processor is None:
        raise ValueError(
            "this model has no processor: load it from a directory that holds the processor files, pass "
            "`processor=` to from_pretrained/from_hf, or tokenise yourself and call prepare(input_ids=...)."
        )
    image_token = getattr(processor, "image_token", None) or "<image>"
    if model.vision is None:
        _no_images(model, images)
    per_prompt = [len(x) for x in images] if _nested(images) else None  # OneVision: images of each prompt
    flat = [im for x in images for im in x] if per_prompt is not None else images
    image_list = None if model.vision is None else _images(flat, prompts, image_token)
    if boxes is not None and len(boxes) != len(prompts):
        raise ValueError(f"boxes must hold one list of boxes per prompt: got {len(boxes)} for {len(prompts)} prompts.")
    given = image_list
    if per_prompt is not None and image_list:  # regrouped: the OneVision processor reads the nesting
        it = iter(image_list)
        given = [[next(it) for _ in range(n)] for n in per_prompt]
    out = _tokenize(processor, given, prompts, spans, padding_side)
    sizes = [(im.height, im.width) if hasattr(im, "height") else tuple(im.shape[-2:]) for im in image_list or []]
    if "image_sizes" in out:  # LLaVA-NeXT processors report them
        sizes = [tuple(int(v) for v in s) for s in out["image_sizes"].tolist()]
    counts = [model.vision.cfg.n_image_tokens if model.vision is not None else 0] * len(sizes)
    per_image = {} if out.get("batch_num_images") is None else {"batch_num_images": out["batch_num_images"].tolist()}
    if model.cfgs.pinpoints is not None:  # LLaVA-NeXT: the count depends on each image's size
        counts = [lay.n_tokens for lay in model.layouts(sizes, per_image.get("batch_num_images"))]
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
        squash=model.cfgs.packing == "llava" and _squashes(getattr(processor, "image_processor", None)),
        texts=prompts,
        **per_image,
        **(videos or {}),
    )


def _nested(images: Any) -> bool:
    return isinstance(images, (list, tuple)) and any(isinstance(im, (list, tuple)) for im in images)


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
    videos: Any = None,
    pixel_values_videos: Tensor | None = None,
    batch_num_images: Any = None,
) -> LlavaInputs:
    """Build `LlavaInputs` with the model's HF processor, or wrap ids the caller tokenised.

    Either give `images` with `prompts` (full prompts containing `<image>`) or `questions`, or
    give `input_ids` (and `pixel_values`) directly. Questions are formatted with the model's chat
    template (one user turn holding the image and the question, then the assistant's turn as the
    checkpoint was trained to start it), or with `template` (a format string with `{question}`)
    when given or when the model has no chat template (then `LLAVA15_TEMPLATE`, or
    `"USER: {question}\\nASSISTANT:"` without images). Text-only models take no images. A word
    the tokenizer does not know is a ValueError that names it.

    LLaVA-OneVision: `images` may be nested, one list per question (several images in one prompt, or
    `[]` for a text-only row); `videos` gives one video per question (a list of frames, or None), and
    HF-style calls pass `pixel_values_videos` and `batch_num_images`.

    Example:
        >>> inputs = model.prepare(images=[img], questions=["What is the color of the circle?"])
        >>> inputs.positions("question")
    """
    if input_ids is not None:
        if images is not None or prompts is not None or questions is not None:
            raise ValueError("give either input_ids (tokenised yourself) or images/prompts, not both.")
        given = dict(
            image_sizes=image_sizes, pixel_values_videos=pixel_values_videos, batch_num_images=batch_num_images
        )
        extra = {k: v for k, v in given.items() if v is not None}
        return wrap_ids(model, input_ids, pixel_values, attention_mask, **extra)
    if videos is not None or _nested(images):
        images, prompts, spans, video = onevision_request(model, images, videos, prompts, questions, template)
        return encode(model, images, prompts, spans, boxes, padding_side, videos=video)
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
