"""Tiny random LLaVA-OneVision and LLaVA-Interleave models (SigLIP tower, Qwen2 language model), a
Qwen2-style tokenizer (byte-level BPE with ChatML tokens and chat template) and the real HF
processors, all built offline from configs.

Used by the tests and the benchmarks; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
CORPUS = (
    "user assistant system What is the color of the circle square star cross? Which object is on the left "
    "or the right side of the picture? red blue green yellow orange purple yes no the a an in this image video "
    "Describe frame first second shape Answer with one word."
)
# ChatML, in the style of the llava-hf OneVision/Interleave checkpoints: images, then videos, then the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'video' %}{{ '<video>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [96, 96]]


def qwen2_style_tokenizer() -> Any:
    """A byte-level BPE `PreTrainedTokenizerFast` trained on a tiny corpus, with Qwen2's ChatML
    special tokens (`<|endoftext|>` pads, `<|im_end|>` ends a turn), `<image>`, `<video>` and a chat
    template. Like Qwen2's, it adds no BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<image>", "<video>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _siglip(image_size: int, patch_size: int, layers: int, d_model: int) -> Any:
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


def _qwen2(tok: Any, d_model: int, layers: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )


def tiny_onevision_config(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    max_num_patches: int = 9,
    feature_layer: int | list[int] = -1,
    strategy: str = "full",
    vision_layers: int = 2,
    n_layers: int = 2,
    d_model: int = 64,
) -> Any:
    """A `LlavaOnevisionConfig`: 32 px views of a 4×4 patch grid, anyres_max_`max_num_patches`."""
    from transformers import LlavaOnevisionConfig

    tok = qwen2_style_tokenizer()
    cfg = LlavaOnevisionConfig(
        vision_config=_siglip(image_size, patch_size, vision_layers, 32),
        text_config=_qwen2(tok, d_model, n_layers),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        vision_aspect_ratio=f"anyres_max_{max_num_patches}",
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_interleave_config(
    *, image_size: int = 32, patch_size: int = 8, feature_layer: int | list[int] = -1, strategy: str = "full"
) -> Any:
    """A `LlavaConfig` with a SigLIP tower and a Qwen2 language model, as LLaVA-Interleave."""
    from transformers import LlavaConfig

    tok = qwen2_style_tokenizer()
    cfg = LlavaConfig(
        vision_config=_siglip(image_size, patch_size, 2, 32),
        text_config=_qwen2(tok, 64, 2),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        tie_word_embeddings=True,
    )
    cfg._attn_implementation = "eager"
    return cfg


def tiny_onevision_processor(config: Any) -> Any:
    """The real `LlavaOnevisionProcessor` for a tiny config (nearest resampling keeps patches local).
    Without torchvision HF has no video processor; videos then go through `model.prepare(videos=...)`."""
    from transformers import LlavaOnevisionImageProcessorPil

    from hooked_llava.loading.processors import onevision_processor_class

    v = config.vision_config
    images = LlavaOnevisionImageProcessorPil(
        size={"height": v.image_size, "width": v.image_size},
        image_grid_pinpoints=PINPOINTS,
        resample=0,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    grid = v.image_size // v.patch_size
    return onevision_processor_class()(
        image_processor=images,
        tokenizer=qwen2_style_tokenizer(),
        num_image_tokens=grid * grid,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_interleave_processor(config: Any) -> Any:
    """The real `LlavaProcessor` with a SigLIP image processor (no CLS token: no additional image token)."""
    from transformers import LlavaProcessor, SiglipImageProcessorPil

    v = config.vision_config
    images = SiglipImageProcessorPil(size={"height": v.image_size, "width": v.image_size}, resample=0)
    return LlavaProcessor(
        image_processor=images,
        tokenizer=qwen2_style_tokenizer(),
        patch_size=v.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_pair(kind: str = "onevision", seed: int = 0, **config: Any) -> tuple[Any, Any]:
    """`(HookedLlava, hf_model)` sharing random weights (image_newline included), with the real processor."""
    from transformers import LlavaForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    from hooked_llava.model.hooked_llava import HookedLlava

    torch.manual_seed(seed)
    if kind == "onevision":
        cfg = tiny_onevision_config(**config)
        hf, processor = LlavaOnevisionForConditionalGeneration(cfg).eval(), tiny_onevision_processor(cfg)
    elif kind == "interleave":
        cfg = tiny_interleave_config(**config)
        hf, processor = LlavaForConditionalGeneration(cfg).eval(), tiny_interleave_processor(cfg)
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'onevision' or 'interleave'.")
    return HookedLlava.from_hf(hf, processor), hf
