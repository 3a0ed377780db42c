"""`HookedLlava`: LLaVA (1.5, NeXT, OneVision, Interleave) reimplemented as a TransformerLens `HookedRootModule`.

The forward pass is: vision tower (CLIP or SigLIP) → projector → packing (one view per image; NeXT's
anyres tiles; OneVision's anyres_max tiles, several images per prompt and pooled video frames) →
merge into the token embeddings at the `<image>` (and `<video>`) placeholders (`hook_embed`) →
Llama/Mistral/Qwen2 blocks → final RMSNorm → unembedding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.HookedRootModule import HookedRootModule

from hooked_llava.inputs import checks
from hooked_llava.inputs.llava_inputs import LlavaInputs
from hooked_llava.inputs.processing import prepare
from hooked_llava.loading import devices
from hooked_llava.loading.pretrained import LoadingMixin
from hooked_llava.model import next as next_
from hooked_llava.model import onevision, tl_state
from hooked_llava.model.attention import Attention, additive_mask, rotary_cos_sin
from hooked_llava.model.components import Embed, GatedMLP, HookPoint, RMSNorm, TransformerBlock, Unembed
from hooked_llava.model.config import LanguageConfig, LlavaConfigs
from hooked_llava.model.kv_cache import KeyValueCache, KeyValueCacheEntry
from hooked_llava.model.vision import build_tower
from hooked_llava.model.vision.projector import Projector
from hooked_llava.model.weights import WeightsMixin
from hooked_llava.surface.entry import EntryMixin
from hooked_llava.surface.generation import GenerationMixin
from hooked_llava.surface.hooks import SurfaceMixin
from hooked_llava.surface.locking import LockingMixin, locked
from hooked_llava.surface.switches import HookingMixin
from hooked_llava.surface.tokens import TokensMixin

ReturnType = Literal["logits", "loss", "both"] | None
PastKV = KeyValueCache | Sequence[KeyValueCacheEntry | None]
DevicePlan = dict[str, torch.device]


def _lm_block(cfg: LanguageConfig, layer: int) -> TransformerBlock:
    window = cfg.layer_windows[layer] if cfg.layer_windows else None
    d_mlp = cfg.d_mlp or 4 * cfg.d_model
    bias = (cfg.attention_bias, cfg.output_bias)
    attn = Attention(cfg, cfg.n_kv_heads, *bias, rotary_base=cfg.rope_theta, window=window)
    mlp = GatedMLP(cfg.d_model, d_mlp, cfg.act_fn, cfg.mlp_bias)
    tl_state.register(attn, tl_state.attention_specs(cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model))
    tl_state.register(mlp, tl_state.gated_mlp_specs(cfg.d_model, d_mlp))
    return TransformerBlock(cfg, attn, mlp, RMSNorm(cfg.d_model, cfg.eps), RMSNorm(cfg.d_model, cfg.eps))


class HookedLlava(
    LockingMixin,
    LoadingMixin,
    TokensMixin,
    EntryMixin,
    WeightsMixin,
    GenerationMixin,
    HookingMixin,
    SurfaceMixin,
    HookedRootModule,
):
    """LLaVA with every internal exposed as a live TransformerLens hook point.

    Threads: one model may be shared; every hooked call holds the model's lock, so concurrent calls
    run one at a time, each with only its own hooks and cache (see `hooked_llava.surface.locking`). A forward
    hook must return None or a tensor of its input's shape and dtype, except inside
    `with model.allow_broadcasting_hooks():`.

    Example:
        >>> model = HookedLlava.from_pretrained("shapes-llava")
        >>> inputs = model.prepare(images=[image], questions=["What is the color of the circle?"])
        >>> logits, cache = model.run_with_cache(inputs)
        >>> cache["blocks.3.attn.hook_pattern"].shape  # [batch, head, query, key]
    """

    _device_plan: DevicePlan | None = None  # set by `devices.place` when the parts span several devices

    def __init__(self, cfgs: LlavaConfigs, processor: Any = None):
        super().__init__()
        self._lock = threading.RLock()
        self.cfgs = cfgs
        self.cfg: LanguageConfig = cfgs.lm
        self.processor = processor
        self.vision = build_tower(cfgs.vision) if cfgs.vision is not None else None
        self.projector = Projector(cfgs.projector) if cfgs.projector is not None else None
        if cfgs.pinpoints is not None:  # LLaVA-NeXT and OneVision
            self.image_newline = nn.Parameter(torch.empty(self.cfg.d_model))
            self.hook_image_newline = HookPoint()  # [rows, d_model]: the newline vectors of one image (or video)
            self.hook_image_features = HookPoint()  # [n_image_tokens, d_model]: all images, packed, before the merge
        if cfgs.packing == "onevision":
            self.hook_video_features = HookPoint()  # [n_video_tokens, d_model]: all videos, pooled, before the merge
        self.embed = Embed(self.cfg.d_vocab, self.cfg.d_model)
        self.hook_embed = HookPoint()  # merged sequence: tokens at text, image features at image positions
        self.blocks = nn.ModuleList(_lm_block(self.cfg, layer) for layer in range(self.cfg.n_layers))
        self.ln_final = RMSNorm(self.cfg.d_model, self.cfg.eps)
        self.unembed = Unembed(self.cfg.d_vocab_out, self.cfg.d_model)
        self.setup()

    # --- forward -------------------------------------------------------------------------
    @locked
    def forward(
        self,
        input: LlavaInputs | Tensor | str | list[str],
        pixel_values: Any = None,  # validated by `checks` with a message that says how to fix it
        attention_mask: Tensor | None = None,
        *,
        image_sizes: Any = None,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        start_at_layer: int | None = None,
        stop_at_layer: int | None = None,
        residual: Tensor | None = None,
        tokens: Tensor | LlavaInputs | None = None,
        shortformer_pos_embed: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Any:
        """Run the model.

        Args:
            input: a `LlavaInputs` from `prepare`, token ids `[batch, pos]` (with
                `pixel_values` when they hold `<image>` placeholders), text, or, with
                `start_at_layer`, the residual `[batch, pos, d_model]` entering that block.
            pixel_values: `[n_images, channels, height, width]`, HF-style.
            attention_mask: `[batch, pos]`, 1 for real tokens, 0 for padding (left or right).
            image_sizes: LLaVA-NeXT only, each image's original `(height, width)`.
            return_type: "logits", "loss" (mean next-token loss, see `loss_fn`), "both" or None.
            loss_per_token: return the loss per prediction, `[batch, pos-1]`, as TransformerLens.
            prepend_bos, padding_side: how text input is tokenised (see `to_tokens`).
            start_at_layer: begin at this block, from the residual given as `input` (the token ids
                or `LlavaInputs` that set its mask, positions and loss then go in `tokens=`;
                without them positions follow `attention_mask`, or count from 0) or as `residual=`
                (with the tokens or inputs as `input`).
            stop_at_layer: return the residual stream before this block instead of logits.
            shortformer_pos_embed: TransformerLens' argument; always None for LLaVA (rotary).
        """
        if shortformer_pos_embed is not None:
            raise ValueError("LLaVA has rotary positions, so there is no shortformer_pos_embed; pass None.")
        entry = dict(pixel_values=pixel_values, attention_mask=attention_mask, image_sizes=image_sizes)
        text = dict(prepend_bos=prepend_bos, padding_side=padding_side)
        if start_at_layer is None:
            if residual is not None or tokens is not None:
                raise ValueError("residual= and tokens= only apply with start_at_layer=; pass the input alone.")
            inputs = self.as_inputs(input, **entry, **text)  # validated, on the model's device
            x, scored = self.embed_inputs(inputs), True  # pixels → vision → projector → merge (hook_embed)
        else:  # TransformerLens' start_at_layer: the residual entering that block (see surface/entry.py)
            x, inputs, scored = self.resume_at_layer(input, residual, tokens, **entry, **text)
        if position_ids is None:
            position_ids = inputs.position_ids()
        x = self.run_blocks(x, inputs.attention_mask, position_ids, start_at_layer or 0, stop_at_layer)
        if stop_at_layer is not None:
            return x
        logits = self.unembed(self.ln_final(x))  # final RMSNorm, then W_U
        if return_type in ("loss", "both") and not scored:
            raise ValueError("a loss needs the tokens the residual came from: pass tokens= (ids or LlavaInputs).")
        return self._output(logits, inputs, return_type, loss_per_token)

    @locked
    def embed_inputs(self, inputs: LlavaInputs) -> Float[Tensor, "batch pos d_model"]:
        """Token embeddings with the projected image (and video) features merged in, through `hook_embed`."""
        embeds = self.embed(inputs.input_ids)
        if inputs.pixel_values is not None:
            per_image = self.image_features(inputs.pixel_values, inputs.image_sizes, inputs.batch_num_images)
            checks.image_feature_count(inputs, per_image)
            features = torch.cat(per_image)
            if self.cfgs.pinpoints is not None:
                features = self.hook_image_features(features)
            embeds = embeds.masked_scatter(inputs.placeholder_mask("image")[..., None], features.to(embeds))
        if inputs.pixel_values_videos is not None:
            per_video = self.video_features(inputs.pixel_values_videos)
            checks.image_feature_count(inputs, per_video, "video")
            features = self.hook_video_features(torch.cat(per_video))
            embeds = embeds.masked_scatter(inputs.placeholder_mask("video")[..., None], features.to(embeds))
        return self.hook_embed(embeds)

    @locked
    def image_features(
        self, pixel_values: Tensor, image_sizes: list[tuple[int, int]] | None = None, batch_num_images: Any = None
    ) -> list[Tensor]:
        """Vision tower and projector: per image, the `[n_tokens, d_model]` vectors that replace
        its placeholders (for LLaVA-NeXT and OneVision: base view, unpadded high-res rows and newlines)."""
        if self.vision is None or self.projector is None:
            raise ValueError("this is a text-only model: it has no vision tower; drop the image inputs.")
        tiled = self.cfgs.pinpoints is not None
        checks.pixel_values(pixel_values, self.vision.cfg, self.W_E.dtype, tiles=tiled)
        checks.finite_pixels(pixel_values)
        pixel_values = pixel_values.to(self.W_E.device, self.W_E.dtype)
        if not tiled:
            return list(self.projector(self.vision(pixel_values)))
        sizes = checks.image_sizes(image_sizes, pixel_values.shape[0])
        packs = self.layouts(sizes, batch_num_images)
        views = torch.cat([px[: p.n_vision_rows] for px, p in zip(pixel_values, packs, strict=True)])
        features = self.projector(self.vision(views)).split([p.n_vision_rows for p in packs])
        if self.cfgs.packing == "onevision":
            return [
                onevision.pack(f, p, self.hook_image_newline(self.image_newline.expand(p.n_newlines, -1)))
                for f, p in zip(features, packs, strict=True)
            ]
        return [
            next_.pack(f, lay, self.hook_image_newline(self.image_newline.expand(lay.rows, -1)))
            for f, lay in zip(features, packs, strict=True)
        ]

    @locked
    def video_features(self, pixel_values_videos: Tensor) -> list[Tensor]:
        """OneVision: per video `[frames, channels, h, w]`, every frame through the tower and projector,
        pooled 2×2, then one newline: `[frames · ⌈grid/2⌉² + 1, d_model]`."""
        assert self.vision is not None and self.projector is not None
        checks.video_pixels(pixel_values_videos, self.vision.cfg, self.cfgs.packing)
        checks.finite_pixels(pixel_values_videos.flatten(0, 1))
        videos = pixel_values_videos.to(self.W_E.device, self.W_E.dtype)
        n, frames = videos.shape[:2]
        features = self.projector(self.vision(videos.flatten(0, 1))).view(n, frames, -1, self.cfg.d_model)
        grid = self.vision.cfg.grid_size
        return [onevision.pack_video(f, grid, self.hook_image_newline(self.image_newline[None])[0]) for f in features]

    def layouts(self, image_sizes: list[tuple[int, int]], batch_num_images: Any = None) -> list[Any]:
        """Tiling of each image, from its original `(height, width)`: LLaVA-NeXT `Layout`s, or OneVision
        `Packing`s (which also depend on how many images each prompt holds, `batch_num_images`)."""
        assert self.vision is not None and self.cfgs.pinpoints is not None
        v = self.vision.cfg
        pins = list(self.cfgs.pinpoints)
        layouts = [next_.make_layout(tuple(s), pins, v.image_size, v.patch_size) for s in image_sizes]
        if self.cfgs.packing != "onevision":
            return layouts
        multi = checks.multi_image(batch_num_images, len(layouts))
        assert self.cfgs.max_num_patches is not None
        return [
            onevision.make_packing(lay, m, self.cfgs.max_num_patches) for lay, m in zip(layouts, multi, strict=True)
        ]

    @locked
    def run_blocks(
        self,
        x: Tensor,
        mask2d: Tensor | None,
        position_ids: Tensor,
        start: int = 0,
        stop: int | None = None,
        past_kv_cache: PastKV | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run blocks `start..stop-1` on the residual `x` (part of the public API, used by the
        analyses to resume from cached residuals); masks and rotary tables are built once for all.

        Args:
            x: `[batch, pos, d_model]` residual entering block `start`.
            mask2d: `[batch, past + pos]` attention mask (1 = real token), or None.
            position_ids: `[batch, pos]` rotary positions of the new tokens.
            past_kv_cache: a `KeyValueCache`, or per layer (indexed by absolute layer) a
                `KeyValueCacheEntry` holding the rotated keys and values `[batch, past, n_kv_heads,
                d_head]` of earlier positions; entries that are not frozen are extended in place.

        Returns:
            The residual after block `stop - 1`.
        """
        n_past = 0 if past_kv_cache is None else _kv_entry(past_kv_cache, start).n_past
        windows = self.cfg.layer_windows or (None,) * self.cfg.n_layers
        masks = {w: self.additive_mask(mask2d, x.shape[1], n_past, x.dtype, w) for w in set(windows[start:stop])}
        rotary = rotary_cos_sin(position_ids, self.cfg.d_head, self.cfg.rope_theta, x.dtype)
        for i, block in enumerate(self.blocks[start:stop], start=start):
            entry = None if past_kv_cache is None else _kv_entry(past_kv_cache, i)
            if self._device_plan is not None:  # the residual, masks and rotary tables follow the blocks
                x, masks, rotary = devices.to_block(self, i, x, masks, rotary)
            x = block(x, None, entry, additive_attention_mask=masks[windows[i]], rotary=rotary)
        return x

    def additive_mask(
        self, mask2d: Tensor | None, n_q: int, n_past: int, dtype: torch.dtype, window: int | None = None
    ) -> Tensor | None:
        """`[batch, 1, q, k]` mask with `finfo.min` where attention is forbidden (future keys,
        padding, keys beyond a sliding window), or None when causal masking alone suffices
        (the attention then uses the fused causal kernel)."""
        return additive_mask(mask2d, n_q, n_past, dtype, window, self.W_E.device)

    def device_plan(self) -> DevicePlan:
        """The device of each part ("vision", "projector", "embed", "blocks.i", "ln_final", "unembed")."""
        return devices.device_plan(self)

    def _output(self, logits: Tensor, inputs: LlavaInputs, return_type: ReturnType, per_token: bool = False) -> Any:
        if return_type is None:
            return None
        if return_type == "logits":
            return logits
        loss = self.loss_fn(
            logits, inputs if self._device_plan is None else inputs.to(logits.device), per_token=per_token
        )
        return loss if return_type == "loss" else (logits, loss)

    # --- inputs ---------------------------------------------------------------------------
    def as_inputs(
        self,
        input: Any,
        pixel_values: Any = None,
        attention_mask: Tensor | None = None,
        image_sizes: Any = None,
        *,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> LlavaInputs:
        """Coerce whatever `forward` was given into a validated `LlavaInputs` on the model's device
        (text is tokenised with `prepend_bos` and `padding_side`, its padding masked)."""
        if isinstance(input, LlavaInputs):
            if pixel_values is not None or attention_mask is not None or image_sizes is not None:
                raise ValueError("pass pixel_values/attention_mask inside the LlavaInputs, not beside it.")
            inputs = input
        else:
            if isinstance(input, (str, list)) and (not isinstance(input, list) or isinstance(input[0], str)):
                if attention_mask is not None:
                    raise ValueError("text is tokenised here, which makes its attention mask: drop attention_mask.")
                input, attention_mask = self.tokenize(input, prepend_bos, padding_side)
            inputs = self.prepare(
                input_ids=input, pixel_values=pixel_values, attention_mask=attention_mask, image_sizes=image_sizes
            )
        checks.inputs(inputs, self)
        return inputs.to(self.W_E.device)

    def prepare(self, images: Any = None, prompts: Any = None, **kwargs: Any) -> LlavaInputs:
        """Build a `LlavaInputs` with the model's HF processor (see `hooked_llava.inputs.processing.prepare`)."""
        return prepare(self, images=images, prompts=prompts, **kwargs)


def _kv_entry(past_kv_cache: PastKV, layer: int) -> KeyValueCacheEntry:
    entry = past_kv_cache[layer]
    if entry is None:
        raise ValueError(f"past_kv_cache has no entry for layer {layer}, which is run: give one per layer run.")
    return entry
