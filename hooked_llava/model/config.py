"""Configuration dataclasses for HookedLlava, built from Hugging Face configs.

`LanguageConfig` describes the Llama-architecture language model and is what `model.cfg`
holds; `VisionConfig` describes the CLIP or SigLIP tower (`model.vision.cfg`); `ProjectorConfig` the
two-layer projector; `LlavaConfigs.packing` names how image features become a sequence ("llava",
"next" or "onevision"). Each is derived by one function that maps every field explicitly and
refuses what it does not support with a message saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from transformer_lens.config import TransformerLensConfig

from hooked_llava.model.config_checks import (
    InvalidConfigError,
    UnsupportedConfigError,
    check_positive,
    validate_text,
    validate_vision,
)

SUPPORTED_TEXT_MODELS = ("llama", "mistral", "qwen2")
TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ACTIVATIONS = ("silu", "gelu", "quick_gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SELECT_STRATEGIES = ("default", "full")


@dataclass
class HookSwitches:
    """TransformerLens' hook switches (off by default, as there), read by every block at each call,
    plus `use_eager_attention` (ours): every attention takes the explicit softmax path."""

    use_attn_result: bool = False  # hook_result, [batch, pos, head, d_model]
    use_split_qkv_input: bool = False  # hook_q_input / hook_k_input / hook_v_input
    use_hook_mlp_in: bool = False  # hook_mlp_in
    use_attn_in: bool = False  # hook_attn_in
    use_eager_attention: bool = False


@dataclass
class LanguageConfig(HookSwitches, TransformerLensConfig):
    """The language model, in TransformerLens' vocabulary (`model.cfg`)."""

    d_vocab_out: int = -1
    rope_theta: float = 10000.0
    attention_bias: bool = False  # biases on q, k and v
    output_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    layer_windows: tuple[int | None, ...] = ()  # per layer: sliding-window size, or None for full attention
    positional_embedding_type: str = "rotary"
    normalization_type: str | None = "RMS"
    uses_rms_norm: bool = True
    final_rms: bool = True
    gated_mlp: bool = True
    act_fn: str = "silu"
    image_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    model_name: str = "llama"
    original_architecture: str = "LlamaForCausalLM"

    @property
    def n_kv_heads(self) -> int:
        return self.n_key_value_heads or self.n_heads


@dataclass
class VisionConfig(HookSwitches, TransformerLensConfig):
    """The vision tower (`model.vision.cfg`), CLIP or SigLIP; only `n_layers_computed` blocks run."""

    image_size: int = 336
    patch_size: int = 14
    n_channels: int = 3
    feature_layers: tuple[int, ...] = (-2,)
    select_strategy: str = "default"
    n_layers_computed: int = 0
    positional_embedding_type: str = "standard"
    normalization_type: str | None = "LN"
    act_fn: str = "quick_gelu"
    attention_bias: bool = True
    tower: str = "clip"  # "clip" (CLS token, pre-LayerNorm) or "siglip" (neither)

    @property
    def has_cls(self) -> bool:
        return self.tower == "clip"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.grid_size**2

    @property
    def n_image_tokens(self) -> int:
        return self.n_patches + int(self.has_cls) - int(self.select_strategy == "default")


@dataclass
class ProjectorConfig:
    d_in: int
    d_model: int
    act_fn: str = "gelu"
    bias: bool = True


@dataclass
class LlavaConfigs:
    """Everything HookedLlava needs, plus the HF config it came from (for saving and NeXT)."""

    lm: LanguageConfig
    vision: VisionConfig | None
    projector: ProjectorConfig | None
    hf_config: Any = field(default=None, repr=False)
    pinpoints: tuple[tuple[int, int], ...] | None = None  # LLaVA-NeXT anyres grid resolutions (height, width)
    packing: str = "llava"  # "llava" (one view per image), "next" (anyres) or "onevision" (anyres_max, video)
    max_num_patches: int | None = None  # OneVision's "anyres_max_N": N base views' worth of high-res tokens
    video_token_id: int | None = None  # OneVision


def _check_act(name: str, where: str) -> str:
    if name not in SUPPORTED_ACTIVATIONS:
        raise UnsupportedConfigError(
            f"{where} uses the activation {name!r}, which HookedLlava does not implement. "
            f"Supported: {', '.join(SUPPORTED_ACTIVATIONS)}."
        )
    return name


def language_config(text: Any, dtype: torch.dtype, device: str | None = None) -> LanguageConfig:
    """Map a Hugging Face Llama config onto `LanguageConfig`, refusing unsupported features."""
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        raise UnsupportedConfigError(
            f"text model type {text.model_type!r} is not supported; HookedLlava implements "
            f"{', '.join(SUPPORTED_TEXT_MODELS)}."
        )
    validate_text(text)
    rope = dict(getattr(text, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise UnsupportedConfigError(
            f"rope scaling type {rope_type!r} is not supported; only unscaled ('default') rotary "
            "embeddings are implemented. Remove `rope_scaling` from the config or use HF directly."
        )
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    check_positive("text config", SimpleNamespace(rope_theta=theta), "rope_theta")
    n_heads = text.num_attention_heads
    qkv_bias = bool(getattr(text, "attention_bias", False)) or text.model_type == "qwen2"
    o_bias = bool(getattr(text, "attention_bias", False)) and text.model_type != "qwen2"
    d_head = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return LanguageConfig(
        d_model=text.hidden_size,
        d_head=d_head,
        n_layers=text.num_hidden_layers,
        n_ctx=text.max_position_embeddings,
        n_heads=n_heads,
        d_mlp=text.intermediate_size,
        d_vocab=text.vocab_size,
        d_vocab_out=text.vocab_size,
        n_key_value_heads=text.num_key_value_heads or n_heads,
        eps=text.rms_norm_eps,
        act_fn=_check_act(text.hidden_act, "the language model"),
        rope_theta=float(theta),
        attention_bias=qkv_bias,
        output_bias=o_bias,
        mlp_bias=bool(getattr(text, "mlp_bias", False)),
        layer_windows=_layer_windows(text),
        model_name=text.model_type,
        original_architecture=TEXT_ARCHITECTURES[text.model_type],
        pad_token_id=getattr(text, "pad_token_id", None),
        bos_token_id=getattr(text, "bos_token_id", None),
        eos_token_id=getattr(text, "eos_token_id", None),
        dtype=dtype,
        device=device or "cpu",
    )


def _layer_windows(text: Any) -> tuple[int | None, ...]:
    """Sliding-window size of every layer, as HF applies it (Mistral: all layers; Qwen2: the
    layers `layer_types` marks "sliding_attention" when `use_sliding_window` is set)."""
    window = getattr(text, "sliding_window", None)
    n = text.num_hidden_layers
    if text.model_type == "mistral":
        return (window,) * n
    if text.model_type == "qwen2" and getattr(text, "use_sliding_window", False) and window:
        types = getattr(text, "layer_types", None) or ["full_attention"] * n
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (None,) * n


def _feature_layers(layer: int | list[int], n_layers: int) -> tuple[tuple[int, ...], int]:
    """Normalise `vision_feature_layer` to hidden-state indices and the blocks to compute.

    Hidden state k (0 ≤ k ≤ n_layers) is the residual after k blocks; k=0 is after pre-LN.
    """
    layers = [layer] if isinstance(layer, int) else list(layer)
    resolved = []
    for value in layers:
        k = value if value >= 0 else n_layers + 1 + value
        if not 0 <= k <= n_layers:
            raise UnsupportedConfigError(
                f"vision_feature_layer {value} is out of range for a {n_layers}-layer vision tower."
            )
        resolved.append(k)
    return tuple(resolved), max(resolved)


def vision_config(v: Any, feature_layer: int | list[int], strategy: str, dtype: torch.dtype) -> VisionConfig:
    """Map a Hugging Face CLIP or SigLIP vision config onto `VisionConfig`."""
    towers = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip", "siglip": "siglip"}
    if v.model_type not in towers:
        raise UnsupportedConfigError(
            f"vision tower type {v.model_type!r} is not supported; HookedLlava implements CLIP and SigLIP."
        )
    tower = towers[v.model_type]
    if strategy not in SELECT_STRATEGIES:
        raise UnsupportedConfigError(
            f"vision_feature_select_strategy {strategy!r} is not supported; use one of {SELECT_STRATEGIES}."
        )
    validate_vision(v)
    layers, computed = _feature_layers(feature_layer, v.num_hidden_layers)
    grid = v.image_size // v.patch_size
    return VisionConfig(
        d_model=v.hidden_size,
        d_head=v.hidden_size // v.num_attention_heads,
        n_layers=v.num_hidden_layers,
        n_ctx=grid * grid + int(tower == "clip"),
        n_heads=v.num_attention_heads,
        d_mlp=v.intermediate_size,
        eps=v.layer_norm_eps,
        act_fn=_check_act(v.hidden_act, "the vision tower"),
        image_size=v.image_size,
        patch_size=v.patch_size,
        n_channels=v.num_channels,
        feature_layers=layers,
        select_strategy=strategy,
        n_layers_computed=computed,
        tower=tower,
        dtype=dtype,
        device="cpu",
    )


ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
}
PACKINGS = {"llava": "llava", "llava_next": "next", "llava_onevision": "onevision"}


def configs_from_hf(hf_config: Any, dtype: torch.dtype | None = None) -> LlavaConfigs:
    """Build all configs from a `LlavaConfig`, `LlavaNextConfig` or `LlavaOnevisionConfig` (or a plain
    Llama, Mistral or Qwen2 config for text-only models)."""
    dtype = dtype or torch.float32
    if hf_config.model_type not in ARCHITECTURES:
        if hf_config.model_type in SUPPORTED_TEXT_MODELS:
            lm = language_config(hf_config, dtype)
            return LlavaConfigs(lm=lm, vision=None, projector=None, hf_config=hf_config)
        raise UnsupportedConfigError(
            f"model type {hf_config.model_type!r} is not supported; HookedLlava loads {', '.join(ARCHITECTURES)} "
            f"and text-only {', '.join(SUPPORTED_TEXT_MODELS)} models."
        )
    lm = language_config(hf_config.text_config, dtype)
    packing = PACKINGS[hf_config.model_type]
    lm.original_architecture = ARCHITECTURES[hf_config.model_type]
    if packing == "next" and hf_config.vision_feature_select_strategy != "default":
        raise UnsupportedConfigError(
            "LLaVA-NeXT tiles need the 'default' vision_feature_select_strategy (CLS dropped); "
            f"got {hf_config.vision_feature_select_strategy!r}."
        )
    lm.image_token_id = _token_id(hf_config.image_token_id, "image_token_id", lm.d_vocab)
    vision = vision_config(
        hf_config.vision_config,
        hf_config.vision_feature_layer,
        hf_config.vision_feature_select_strategy,
        dtype,
    )
    projector = ProjectorConfig(
        d_in=vision.d_model * len(vision.feature_layers),
        d_model=lm.d_model,
        act_fn=_check_act(hf_config.projector_hidden_act, "the projector"),
        bias=bool(getattr(hf_config, "multimodal_projector_bias", True)),
    )
    cfgs = LlavaConfigs(lm=lm, vision=vision, projector=projector, hf_config=hf_config, packing=packing)
    if packing != "llava":
        cfgs.pinpoints = tuple(tuple(p) for p in hf_config.image_grid_pinpoints)
    if packing == "onevision":
        _onevision(cfgs, hf_config)
    return cfgs


def _token_id(value: Any, name: str, d_vocab: int) -> int:
    if not isinstance(value, int) or not 0 <= value < d_vocab:
        raise InvalidConfigError(
            f"{name}={value!r} is not a token id of the {d_vocab}-token vocabulary; fix config.json."
        )
    return value


def _onevision(cfgs: LlavaConfigs, hf_config: Any) -> None:
    """OneVision's extras: the anyres_max budget and the video placeholder."""
    ratio = str(getattr(hf_config, "vision_aspect_ratio", "anyres_max_9"))
    if not ratio.startswith("anyres_max_") or not ratio[len("anyres_max_") :].isdigit():
        raise UnsupportedConfigError(
            f"vision_aspect_ratio {ratio!r} is not supported; HookedLlava implements 'anyres_max_N' (as HF does)."
        )
    cfgs.max_num_patches = int(ratio[len("anyres_max_") :])
    if hf_config.vision_feature_select_strategy != "full":  # HF's own packing then fails on the base view
        raise UnsupportedConfigError(
            "LLaVA-OneVision packs whole patch grids, so it needs vision_feature_select_strategy 'full'; "
            f"got {hf_config.vision_feature_select_strategy!r}."
        )
    cfgs.video_token_id = _token_id(hf_config.video_token_id, "video_token_id", cfgs.lm.d_vocab)
