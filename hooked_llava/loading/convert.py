"""Pure state-dict conversions from Hugging Face checkpoints to HookedLlava.

Each sub-model has one function `dict[str, Tensor] -> dict[str, Tensor]`; `convert`
splits a checkpoint by prefix (both the on-disk `language_model.model.*` layout and the
transformers ≥5 `model.language_model.*` one), composes them, and accounts for every key:
each source key is consumed or deliberately ignored, and anything else is an error. Every
tensor taken must have its asserted shape and finite values (a NaN or inf is an error naming it).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from hooked_llava.model.config import LlavaConfigs

# (prefix in the checkpoint, sub-model); the first match wins.
PREFIXES = (
    ("model.language_model.", "lm"),
    ("language_model.model.", "lm"),
    ("language_model.lm_head.", "head"),
    ("lm_head.", "head"),
    ("model.vision_tower.vision_model.", "vision"),
    ("vision_tower.vision_model.", "vision"),
    ("model.vision_tower.", "vision"),  # transformers ≥5 in memory
    ("vision_tower.", "vision"),
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
    ("model.image_newline", "newline"),  # LLaVA-NeXT
    ("image_newline", "newline"),
    ("model.", "lm"),  # text-only LlamaForCausalLM
)
# Keys a checkpoint may carry that HookedLlava deliberately does not use.
IGNORED = (
    r"vision:post_layernorm\..*",  # never reaches the language model
    r"vision:head\..*",  # SigLIP's attention-pooling head, unused by LLaVA
    r"vision:embeddings\.position_ids",
    r"lm:layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"lm:rotary_emb\.inv_freq",
)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded unambiguously: its files, keys, shapes or values are wrong."""


class _Keys:
    """Source keys of one sub-model; records which were consumed."""

    def __init__(self, name: str, sd: dict[str, Tensor]):
        self.name, self.sd, self.used = name, sd, set[str]()

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        if key not in self.sd:
            raise CheckpointError(f"checkpoint is missing the key {self.name}:{key!r}.")
        t = self.sd[key]
        if shape is not None and tuple(t.shape) != shape:
            raise CheckpointError(f"{self.name}:{key!r} has shape {tuple(t.shape)}, expected {shape}.")
        if not t.is_floating_point():  # an int or bool weight would be cast silently and move every logit
            raise CheckpointError(
                f"{self.name}:{key!r} is stored as {t.dtype}, but it is a floating-point weight; the checkpoint "
                "was written wrongly (re-save it in float16/bfloat16/float32)."
            )
        if t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(
                f"{self.name}:{key!r} has {bad} non-finite value(s) (NaN or inf); the checkpoint is corrupt."
            )
        self.used.add(key)
        return t

    def maybe(self, key: str, shape: tuple[int, ...]) -> Tensor | None:
        return self.take(key, shape) if key in self.sd else None

    def leftover(self) -> list[str]:
        extra = [f"{self.name}:{k}" for k in self.sd if k not in self.used]
        return [k for k in extra if not any(re.fullmatch(p, k) for p in IGNORED)]


def convert_llama(src: _Keys, cfgs: LlavaConfigs) -> dict[str, Tensor]:
    c = cfgs.lm
    d, hd, kv, mlp = c.d_model, c.n_heads * c.d_head, c.n_kv_heads * c.d_head, c.d_mlp or 4 * c.d_model
    out = {"embed.W_E": src.take("embed_tokens.weight", (c.d_vocab, d)), "ln_final.w": src.take("norm.weight", (d,))}
    for i in range(c.n_layers):
        p, q = f"layers.{i}.", f"blocks.{i}."
        out[q + "ln1.w"] = src.take(p + "input_layernorm.weight", (d,))
        out[q + "ln2.w"] = src.take(p + "post_attention_layernorm.weight", (d,))
        for ours, theirs, rows in (("q", "q_proj", hd), ("k", "k_proj", kv), ("v", "v_proj", kv)):
            out[q + f"attn.w_{ours}"] = src.take(p + f"self_attn.{theirs}.weight", (rows, d))
            if c.attention_bias:
                out[q + f"attn.b_{ours}"] = src.take(p + f"self_attn.{theirs}.bias", (rows,))
        out[q + "attn.w_o"] = src.take(p + "self_attn.o_proj.weight", (d, hd))
        if c.output_bias:
            out[q + "attn.b_o"] = src.take(p + "self_attn.o_proj.bias", (d,))
        for ours, theirs, shape in (
            ("gate", "gate_proj", (mlp, d)),
            ("in", "up_proj", (mlp, d)),
            ("out", "down_proj", (d, mlp)),
        ):
            out[q + f"mlp.w_{ours}"] = src.take(p + f"mlp.{theirs}.weight", shape)
            if c.mlp_bias:
                out[q + f"mlp.bias_{ours}"] = src.take(p + f"mlp.{theirs}.bias", shape[:1])
    return out


def convert_head(src: _Keys, cfgs: LlavaConfigs, embed: Tensor, tied: bool) -> dict[str, Tensor]:
    if tied and "weight" not in src.sd:
        return {"unembed.w_u": embed.clone()}  # untied copy: weight processing edits W_U in place
    return {"unembed.w_u": src.take("weight", (cfgs.lm.d_vocab_out, cfgs.lm.d_model))}


def convert_clip_vision(src: _Keys, cfgs: LlavaConfigs) -> dict[str, Tensor]:
    """The computed blocks only; blocks past the deepest feature layer are ignored."""
    v = cfgs.vision
    assert v is not None
    d = v.d_model
    out = {
        "vision.w_patch": src.take("embeddings.patch_embedding.weight", (d, v.n_channels, v.patch_size, v.patch_size)),
        "vision.cls": src.take("embeddings.class_embedding", (d,)),
        "vision.w_pos": src.take("embeddings.position_embedding.weight", (v.n_ctx, d)),
        "vision.ln_pre.w": src.take("pre_layrnorm.weight", (d,)),
        "vision.ln_pre.b": src.take("pre_layrnorm.bias", (d,)),
    }
    out.update(_vision_blocks(src, cfgs))
    return out


def _vision_blocks(src: _Keys, cfgs: LlavaConfigs) -> dict[str, Tensor]:
    """The encoder layers CLIP and SigLIP share (same key names); layers past the deepest feature layer are skipped."""
    v = cfgs.vision
    assert v is not None
    d, out = v.d_model, {}
    for i in range(v.n_layers):
        p, q = f"encoder.layers.{i}.", f"vision.blocks.{i}."
        if i >= v.n_layers_computed:
            src.used.update(k for k in src.sd if k.startswith(p))
            continue
        for n in (1, 2):
            out[q + f"ln{n}.w"] = src.take(p + f"layer_norm{n}.weight", (d,))
            out[q + f"ln{n}.b"] = src.take(p + f"layer_norm{n}.bias", (d,))
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            out[q + f"attn.w_{ours}"] = src.take(p + f"self_attn.{theirs}.weight", (d, d))
            out[q + f"attn.b_{ours}"] = src.take(p + f"self_attn.{theirs}.bias", (d,))
        out[q + "mlp.w_in"] = src.take(p + "mlp.fc1.weight", (v.d_mlp, d))
        out[q + "mlp.bias_in"] = src.take(p + "mlp.fc1.bias", (v.d_mlp,))
        out[q + "mlp.w_out"] = src.take(p + "mlp.fc2.weight", (d, v.d_mlp))
        out[q + "mlp.bias_out"] = src.take(p + "mlp.fc2.bias", (d,))
    return out


def convert_siglip_vision(src: _Keys, cfgs: LlavaConfigs) -> dict[str, Tensor]:
    """SigLIP: patch conv with bias, positions without CLS, no pre-LayerNorm; the computed blocks only."""
    v = cfgs.vision
    assert v is not None
    d, p = v.d_model, v.patch_size
    out = {
        "vision.w_patch": src.take("embeddings.patch_embedding.weight", (d, v.n_channels, p, p)),
        "vision.b_patch": src.take("embeddings.patch_embedding.bias", (d,)),
        "vision.w_pos": src.take("embeddings.position_embedding.weight", (v.n_ctx, d)),
    }
    out.update(_vision_blocks(src, cfgs))
    return out


def convert_projector(src: _Keys, cfgs: LlavaConfigs) -> dict[str, Tensor]:
    p = cfgs.projector
    assert p is not None
    out = {
        "projector.w_in": src.take("linear_1.weight", (p.d_model, p.d_in)),
        "projector.w_out": src.take("linear_2.weight", (p.d_model, p.d_model)),
    }
    if p.bias:
        out["projector.b_in"] = src.take("linear_1.bias", (p.d_model,))
        out["projector.b_out"] = src.take("linear_2.bias", (p.d_model,))
    return out


def split(sd: dict[str, Tensor], multimodal: bool) -> dict[str, dict[str, Tensor]]:
    """Group checkpoint keys by sub-model, stripping either layout's prefix."""
    parts: dict[str, dict[str, Tensor]] = {
        "lm": {},
        "head": {},
        "vision": {},
        "projector": {},
        "newline": {},
        "unknown": {},
    }
    for key, tensor in sd.items():
        for prefix, part in PREFIXES:
            if key.startswith(prefix) and (multimodal or part in ("lm", "head")):
                parts[part][key[len(prefix) :]] = tensor
                break
        else:
            parts["unknown"][key] = tensor
    return parts


def convert(sd: dict[str, Tensor], cfgs: LlavaConfigs, tied: bool = False) -> dict[str, Tensor]:
    """A whole HF state dict to HookedLlava's stored parameters (HF layout, e.g. `blocks.0.attn.w_q`;
    `state_dict()` shows them under TransformerLens' names, see `tl_state`), with strict key accounting."""
    multimodal = cfgs.vision is not None
    parts = split(sd, multimodal)
    if parts["unknown"]:
        names = sorted(parts["unknown"])
        raise CheckpointError(f"checkpoint has {len(names)} unexpected key(s): {names[:10]}")
    keys = {name: _Keys(name, part) for name, part in parts.items() if name != "unknown"}
    out = convert_llama(keys["lm"], cfgs)
    out.update(convert_head(keys["head"], cfgs, out["embed.W_E"], tied))
    if multimodal:
        tower = convert_siglip_vision if cfgs.vision.tower == "siglip" else convert_clip_vision  # type: ignore[union-attr]
        out.update(tower(keys["vision"], cfgs))
        out.update(convert_projector(keys["projector"], cfgs))
    if cfgs.pinpoints is not None:
        out["image_newline"] = keys["newline"].take("", (cfgs.lm.d_model,))
    extra = [k for src in keys.values() for k in src.leftover()]
    if extra:
        raise CheckpointError(f"checkpoint has {len(extra)} unexpected key(s): {sorted(extra)[:10]}")
    return out
