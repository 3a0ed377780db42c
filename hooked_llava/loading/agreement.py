"""Does a checkpoint's `config.json` agree with the processor saved beside it?

A LLaVA checkpoint stores the image token, the feature strategy ("default" drops CLS, "full" keeps
it), the patch size and the image size twice: in `config.json` for the model and in the processor's
config for `prepare`. When they disagree, the processor expands `<image>` into the wrong number of
tokens (or the wrong id) and the first forward fails far from the cause. `check_processor` compares
them when the checkpoint is loaded and names every field that disagrees.
"""

from __future__ import annotations

from typing import Any

from hooked_llava.loading.convert import CheckpointError


def _processor_image_token(processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    token, tokenizer = getattr(processor, "image_token", None), getattr(processor, "tokenizer", None)
    if token is None or tokenizer is None:
        return None
    return tokenizer.convert_tokens_to_ids(token)


def _processor_image_size(image_processor: Any) -> tuple[int, int] | None:
    """The square the vision tower sees: the centre crop if the processor crops, else a fixed resize."""
    crop, size = getattr(image_processor, "crop_size", None), getattr(image_processor, "size", None)
    for box in ([crop] if getattr(image_processor, "do_center_crop", False) else []) + [size]:
        get = box.get if isinstance(box, dict) else lambda key, box=box: getattr(box, key, None)  # dict or SizeDict
        if get("height") is not None and get("width") is not None:
            return int(get("height")), int(get("width"))
    return None


def disagreements(hf_config: Any, processor: Any) -> list[str]:
    """`field: config.json says X, the processor says Y` for every field where the two disagree."""
    vision, image_processor = getattr(hf_config, "vision_config", None), getattr(processor, "image_processor", None)
    if vision is None or image_processor is None:
        return []  # a text-only model, or a bare tokenizer: nothing to compare
    config_token = getattr(hf_config, "image_token_id", None)
    config_token = config_token if config_token is not None else getattr(hf_config, "image_token_index", None)
    size = getattr(vision, "image_size", None)
    pairs = [
        ("image token id", config_token, _processor_image_token(processor)),
        ("vision_feature_select_strategy", getattr(hf_config, "vision_feature_select_strategy", None),
         getattr(processor, "vision_feature_select_strategy", None)),
        ("patch_size", getattr(vision, "patch_size", None), getattr(processor, "patch_size", None)),
        ("image size", None if size is None else (size, size), _processor_image_size(image_processor)),
    ]  # fmt: skip
    return [f"{field}: config.json says {a!r}, the processor says {b!r}"
            for field, a, b in pairs if a is not None and b is not None and a != b]  # fmt: skip


def check_processor(hf_config: Any, processor: Any, where: Any) -> None:
    """Raise a `CheckpointError` naming every field where `config.json` and the saved processor disagree."""
    fields = disagreements(hf_config, processor)
    if fields:
        raise CheckpointError(
            f"{where}: config.json and the saved processor config disagree ({'; '.join(fields)}). Inputs made by this "
            "processor would not fit the model: fix one of the two files, or pass processor=... to use your own."
        )
