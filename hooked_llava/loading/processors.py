"""LLaVA-OneVision's processor where HF cannot build it: HF's OneVision processor needs a video
processor, which needs torchvision. Without torchvision, `image_only_onevision_processor` is the same
processor with images and text only (prompts then take videos through `model.prepare(videos=...)`,
which resizes frames itself), and `load_onevision_processor` builds it from a saved checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hooked_llava.loading.checkpoint_files import read_json


def onevision_processor_class() -> Any:
    """`LlavaOnevisionProcessor`, or without torchvision the same class with images and text only."""
    from transformers import LlavaOnevisionProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return LlavaOnevisionProcessor

    class ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return ["image_processor", "tokenizer"]

    return ImageOnlyOnevisionProcessor


def load_onevision_processor(directory: Path) -> Any:
    """The OneVision processor saved in `directory`, built from its processor and tokenizer files.

    Raises:
        ValueError: the folder is not a OneVision checkpoint, or lacks its image-processor settings.
    """
    from transformers import AutoTokenizer, LlavaOnevisionImageProcessorPil

    if read_json(directory / "config.json").get("model_type") != "llava_onevision":
        raise ValueError(f"{directory} is not a LLaVA-OneVision checkpoint.")
    settings = read_json(directory / "processor_config.json") if (directory / "processor_config.json").exists() else {}
    images = settings.get("image_processor")
    if images is None and (directory / "preprocessor_config.json").exists():
        images = read_json(directory / "preprocessor_config.json")
    if images is None:
        raise ValueError(
            f"{directory} holds no image-processor settings (processor_config.json or preprocessor_config.json)."
        )
    drop = ("image_processor_type", "processor_class", "auto_map")
    image_processor = LlavaOnevisionImageProcessorPil(**{k: v for k, v in images.items() if k not in drop})
    tokenizer = AutoTokenizer.from_pretrained(directory)
    keep = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
    return onevision_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=getattr(tokenizer, "chat_template", None),
        **{k: settings[k] for k in keep if k in settings},
    )
