"""Tiny random LLaVA models and processors, built offline from configs.

Used by the tests, the benchmarks and the docstring examples; nothing is downloaded.
"""

from __future__ import annotations

from typing import Any

import torch

WORDS = (
    "USER ASSISTANT : ? . , \n What is the color of a an circle square red blue green yellow "
    "left right yes no Is or Which shape picture side on which to There in image this"
).split(" ")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


def tiny_tokenizer() -> Any:
    """A word-level `PreTrainedTokenizerFast` with BOS, EOS, PAD, UNK and `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [w for w in WORDS if w])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.unknown_words = "warn"  # `prepare` only warns: tests ask this 36-word toy about words it lacks ("it")
    return fast


def tiny_processor(image_size: int = 32, patch_size: int = 8, strategy: str = "default") -> Any:
    """A real `LlavaProcessor`: the word-level tokenizer and a `CLIPImageProcessor` at `image_size`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
    )


def tiny_llava_config(
    *,
    vocab_size: int | None = None,
    d_model: int = 64,
    n_layers: int = 3,
    n_heads: int = 4,
    n_kv_heads: int | None = 2,
    vision_layers: int = 3,
    vision_d_model: int = 32,
    image_size: int = 32,
    patch_size: int = 8,
    feature_layer: int | list[int] = -2,
    strategy: str = "default",
    attn_implementation: str = "eager",
    d_mlp: int | None = None,
    vision_d_mlp: int | None = None,
    max_position_embeddings: int = 512,
    **text_overrides: Any,
) -> Any:
    """A `LlavaConfig` small enough to build in milliseconds."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tok = tiny_tokenizer()
    text = LlamaConfig(
        vocab_size=vocab_size or len(tok),
        hidden_size=d_model,
        intermediate_size=d_mlp or 2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **text_overrides,
    )
    vision = CLIPVisionConfig(
        hidden_size=vision_d_model,
        intermediate_size=vision_d_mlp or 2 * vision_d_model,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def tiny_hf_llava(seed: int = 0, random_norms: bool = False, **config: Any) -> Any:
    """A randomly initialised `LlavaForConditionalGeneration` in eval mode.

    `random_norms` draws the language model's RMSNorm weights around 1 (HF initialises them to
    ones), so a computation that forgets the norm weight shows up in comparisons.
    """
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(tiny_llava_config(**config)).eval()
    if random_norms:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in hf.model.language_model.named_parameters():
                if "norm" in name:
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=gen))
    return hf


def tiny_model(seed: int = 0, **config: Any) -> tuple[Any, Any]:
    """`(HookedLlava, hf_model)` sharing the same random weights, with a tiny processor."""
    from hooked_llava.model.hooked_llava import HookedLlava

    hf = tiny_hf_llava(seed, **config)
    vision = hf.config.vision_config
    processor = tiny_processor(vision.image_size, vision.patch_size, hf.config.vision_feature_select_strategy)
    return HookedLlava.from_hf(hf, processor), hf


def random_images(n: int, size: int = 32, seed: int = 0) -> list[Any]:
    """`n` random RGB PIL images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def tiny_next_config(text_model: str = "llama", **overrides: Any) -> Any:
    """A `LlavaNextConfig` with 32 px tiles (patch 8) and a few anyres grids, text model
    "llama", "mistral" or "qwen2"."""
    from transformers import LlavaNextConfig

    base = tiny_llava_config(**overrides)
    text = _text_config(text_model, base.text_config)
    cfg = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=text,
        image_token_id=base.image_token_id,
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
    )
    cfg._attn_implementation = "eager"
    return cfg


def _text_config(kind: str, llama: Any) -> Any:
    """The Llama text config re-expressed as another architecture (same sizes)."""
    from transformers import MistralConfig, Qwen2Config

    if kind == "llama":
        return llama
    fields = {
        k: getattr(llama, k)
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
        )
    }
    if kind == "mistral":
        return MistralConfig(**fields, sliding_window=24)
    if kind == "qwen2":
        return Qwen2Config(**fields, use_sliding_window=True, sliding_window=24, max_window_layers=1)
    raise ValueError(f"unknown text model {kind!r}; use 'llama', 'mistral' or 'qwen2'.")


def tiny_next_processor(image_size: int = 32, patch_size: int = 8) -> Any:
    """A real `LlavaNextProcessor` for `tiny_next_config` (nearest resampling keeps patches local)."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    images = LlavaNextImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]],
        resample=0,
    )
    return LlavaNextProcessor(
        image_processor=images,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
