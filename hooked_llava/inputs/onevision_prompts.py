"""LLaVA-OneVision prompts: several images per question, text-only rows beside them, and video.

Questions go through the checkpoint's own chat template (ChatML for OneVision and Interleave), with
one `{"type": "image"}` per image of the question and `{"type": "video"}` for its video. Videos are
resized and normalised by the processor's video processor, or, where HF has none (it needs
torchvision), frame by frame with the image processor's size, mean and std; each `<video>` is then
expanded to its `frames · ⌈grid/2⌉² + 1` placeholders before the prompts are tokenised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hooked_llava.inputs.llava_inputs import question_spans
from hooked_llava.inputs.prompts import _span, chat_template
from hooked_llava.model.onevision import pooled_side

if TYPE_CHECKING:
    from hooked_llava.model.hooked_llava import HookedLlava


def _per_question(items: Any, n: int, name: str) -> list[Any]:
    if items is None:
        return [None] * n
    items = list(items)
    if len(items) != n:
        raise ValueError(f"give one entry of {name} per question (None or [] for none): got {len(items)} for {n}.")
    return items


def chat_prompts(
    processor: Any, questions: list[str], n_images: list[int], has_video: list[bool]
) -> tuple[list[str], list[tuple[int, int]]]:
    """ChatML prompts (the checkpoint's chat template) and each question's character span."""
    chat = chat_template(processor)
    if chat is None:
        raise ValueError("this model's processor has no chat template; write the prompts yourself with prompts=[...].")
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts, spans = [], []
    for q, n, video in zip(questions, n_images, has_video, strict=True):
        content = [{"type": "image"}] * n + [{"type": "video"}] * video + [{"type": "text", "text": q}]
        messages = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(messages, chat_template=chat, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt)
        spans.append(_span(prompt, q, "<video>" if video else getattr(processor, "image_token", "<image>")))
    return prompts, spans


def video_pixels(processor: Any, frames: list[Any], side: int) -> torch.Tensor:
    """One video's `[frames, 3, side, side]` pixels: the processor's video processor where it has one,
    else each frame resized (bicubic) to a square, rescaled and normalised as the image processor does."""
    videos = getattr(processor, "video_processor", None)
    if videos is not None:
        return videos(videos=[frames], return_tensors="pt")["pixel_values_videos"][0]
    from PIL import Image

    images = processor.image_processor
    mean = np.asarray(images.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(images.image_std, dtype=np.float32)[:, None, None]
    out = []
    for frame in frames:
        im = frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, dtype=np.uint8))
        arr = np.asarray(im.convert("RGB").resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
        out.append((arr.transpose(2, 0, 1) - mean) / std)
    return torch.from_numpy(np.stack(out))


def onevision_request(
    model: HookedLlava,
    images: Any,
    videos: Any,
    prompts: Any,
    questions: Any,
    template: str | None,
) -> tuple[list[list[Any]] | None, list[str], list[Any], dict[str, Any] | None]:
    """`prepare`'s arguments for nested images (one list per question) and videos (one list of frames per
    question, or None): `(images per prompt, prompts with videos expanded, question spans, video inputs)`,
    which `processing.encode` turns into `LlavaInputs`."""
    if model.cfgs.packing != "onevision" and videos is not None:
        raise ValueError(f"only LLaVA-OneVision models take videos; this is a {model.cfg.original_architecture}.")
    if template is not None:
        raise ValueError("template= is not supported with nested images or videos; pass prompts=[...] instead.")
    texts = (
        [questions] if isinstance(questions, str) else [prompts] if isinstance(prompts, str) else questions or prompts
    )
    if texts is None:
        raise ValueError("nothing to prepare: give questions (or prompts) with the images and videos.")
    per_images = [list(x or []) for x in _per_question(images, len(texts), "images")]
    per_video = _per_question(videos, len(texts), "videos")
    if questions is not None:
        texts, spans = chat_prompts(
            model.processor, list(texts), [len(x) for x in per_images], [v is not None for v in per_video]
        )
    else:
        texts, spans = list(texts), question_spans(list(texts))
    assert model.vision is not None
    v = model.vision.cfg
    clips = [video_pixels(model.processor, list(frames), v.image_size) for frames in per_video if frames is not None]
    if len({clip.shape[0] for clip in clips}) > 1:
        raise ValueError(
            f"the videos have {[clip.shape[0] for clip in clips]} frames; videos in one batch need the same number "
            "of frames (as in HF): sample them to one length, or prepare them in separate batches."
        )
    n_per_frame = pooled_side(v.grid_size) ** 2
    expanded = iter(clips)
    for i, frames in enumerate(per_video):
        if frames is None:
            continue
        clip = next(expanded)
        texts[i] = texts[i].replace("<video>", "<video>" * (clip.shape[0] * n_per_frame + 1), 1)
        if spans[i] is not None:
            shift = (clip.shape[0] * n_per_frame) * len("<video>")
            spans[i] = (spans[i][0] + shift, spans[i][1] + shift)
    extra = None
    if clips:
        sizes = [_frame_size(frames[0]) for frames in per_video if frames is not None]
        extra = {"pixel_values_videos": torch.stack(clips), "video_sizes": sizes}
    return (per_images if any(per_images) else None), texts, spans, extra


def _frame_size(frame: Any) -> tuple[int, int]:
    return (frame.height, frame.width) if hasattr(frame, "height") else tuple(np.asarray(frame).shape[:2])
