"""LLaVA-OneVision-0.5B widths: HookedLlava's forward and default cache against pristine HF models, and
the memory of a default cache at full depth (0.5B and 7B), computed from the hook shapes.

Widths: Qwen2-0.5B (d_model 896, 14 heads, 2 key/value heads, MLP 4864, vocabulary 151936) and
SigLIP-so400m (width 1152, 16 heads, MLP 4304, patch 14, 384 px), random weights, bf16, at reduced
depth (`--lm-layers`, `--vision-layers`), one square image: 384 px is a base view and one tile (1485
image tokens), `--image-size 768` a base view and 2 × 2 tiles. HF eager, HF SDPA and HookedLlava are
separate objects on copied weights; each compared pair is called back to back in every round, order
swapped in turn (`harness.interleaved`), CPU time.

    python bench/onevision.py [--rounds 20] [--lm-layers 2] [--vision-layers 2] [--image-size 384] [--memory-only]

The memory table counts every activation a default `run_with_cache` holds (every hook that fires
without a switch; `hook_result` is opt-in), from the shapes each hook has; the count is checked
against a real cache of a small model before it is printed.
"""

from __future__ import annotations

import argparse

import harness as h
import torch

from hooked_llava import HookedLlava
from hooked_llava.loading.processors import onevision_processor_class
from hooked_llava.testing_onevision import qwen2_style_tokenizer, tiny_pair

QWEN2 = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "7B": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4),
}  # fmt: skip
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, patch_size=14, image_size=384)
SIGLIP_LAYERS = 26  # the llava-hf OneVision configs keep 26 of so400m's 27 blocks and read the last
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
PAIRS = [("HF eager", "HookedLlava run_with_cache (default)"), ("HF sdpa", "HookedLlava forward")]


def config(size: str, lm_layers: int, vision_layers: int, attn: str) -> object:
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tok = qwen2_style_tokenizer()
    text = Qwen2Config(
        **{**QWEN2[size], "num_hidden_layers": lm_layers},
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = SiglipVisionConfig(**SIGLIP, num_hidden_layers=vision_layers, vision_use_head=False)
    cfg = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=True,
    )  # fmt: skip
    cfg._attn_implementation = attn
    return cfg


def processor(cfg: object) -> object:
    from transformers import LlavaOnevisionImageProcessorPil

    images = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=PINPOINTS)
    return onevision_processor_class()(
        image_processor=images, tokenizer=qwen2_style_tokenizer(), num_image_tokens=729,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )  # fmt: skip


def speed(args: argparse.Namespace) -> None:
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    eager = LlavaOnevisionForConditionalGeneration(config("0.5B", args.lm_layers, args.vision_layers, "eager"))
    eager = eager.to(torch.bfloat16).eval()
    sdpa = LlavaOnevisionForConditionalGeneration(config("0.5B", args.lm_layers, args.vision_layers, "sdpa"))
    sdpa = sdpa.to(torch.bfloat16).eval()
    sdpa.load_state_dict(eager.state_dict())
    hooked = HookedLlava.from_hf(eager, processor(eager.config))
    image = h.random_images(1, args.image_size)[0]
    inputs = hooked.prepare(questions=[h.QUESTION], images=[[image]])
    kw = dict(
        input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, pixel_values=inputs.pixel_values,
        image_sizes=torch.tensor(inputs.image_sizes), batch_num_images=torch.tensor(inputs.batch_num_images),
    )  # fmt: skip
    runs = {
        "HF eager": lambda: eager(**kw).logits,
        "HF sdpa": lambda: sdpa(**kw).logits,
        "HookedLlava forward": lambda: hooked(inputs),
        "HookedLlava run_with_cache (default)": lambda: hooked.run_with_cache(inputs),
    }
    t = h.interleaved(runs, args.rounds, pairs=PAIRS)
    n_params = sum(p.numel() for p in eager.parameters())
    print(
        f"\n== OneVision-0.5B widths, {args.lm_layers}+{args.vision_layers} layers (LM+vision), "
        f"{n_params / 1e6:.0f}M parameters, bf16, a {args.image_size} px image, "
        f"1 × {inputs.input_ids.shape[1]} positions, {args.rounds} rounds, {torch.get_num_threads()} thread(s) =="
    )
    h.print_table(t)
    print(f"  forward × HF sdpa:        {h.verdict(t.ratios('HookedLlava forward', 'HF sdpa'), 1.05)}")
    cache = t.ratios("HookedLlava run_with_cache (default)", "HF eager")
    print(f"  default cache × HF eager: {h.verdict(cache, 1.15)}")


def cache_numel(lm: dict, n: int, vision_layers: int, views: int, n_image: int, d_v: int = 1152, mlp_v: int = 4304,
                heads_v: int = 16, patches: int = 729) -> int:  # fmt: skip
    """Elements of a default cache: `n` positions (`n_image` of them image tokens), `views` vision views."""
    d, m, nh, kv, layers = (lm[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                            "num_key_value_heads", "num_hidden_layers"))  # fmt: skip
    e = d // nh
    per_lm = 7 * n * d + 2 * n + n * nh * e * 3 + 3 * n * kv * e + 2 * nh * n * n + 3 * n * m
    N = views * patches
    per_v = 7 * N * d_v + 2 * N + 4 * N * d_v + 2 * views * heads_v * patches**2 + 2 * N * mlp_v
    vision = 3 * N * d_v + vision_layers * per_v
    projector = N * d_v + 3 * N * d
    rest = n_image * d + n * d + n + n * d  # packed image features, hook_embed, ln_final's two hooks
    return layers * per_lm + vision + projector + rest


def check_count() -> None:
    """The shape count against a real default cache of a small OneVision model (no newline rows counted
    apart: they are in the packed features)."""
    model, _ = tiny_pair("onevision", vision_layers=2, n_layers=2)
    inputs = model.prepare(questions=["What is the color?"], images=[[h.random_images(1, 32)[0]]])
    _, cache = model.run_with_cache(inputs)
    newline = sum(v.numel() for k, v in cache.items() if k == "hook_image_newline")
    real = sum(v.numel() for v in cache.values()) - newline
    lm = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    n, n_image = inputs.input_ids.shape[1], int(inputs.image_mask.sum())
    views = model.layouts(inputs.image_sizes)[0].n_vision_rows
    counted = cache_numel(lm, n, 2, views, n_image, d_v=32, mlp_v=64, heads_v=4, patches=16)
    assert counted == real, (counted, real)
    print(f"shape count checked against a real default cache: {counted} = {real} elements")


def memory() -> None:
    check_count()
    print("\n== default run_with_cache at full depth, bf16 (2 bytes), one image, batch 1 ==")
    print(
        "| model | image | views | positions | weights (matrices) | cache |\n| --- | --- | ---: | ---: | ---: | ---: |"
    )
    for size in ("0.5B", "7B"):
        lm = QWEN2[size]
        for side, views, n_image in ((384, 2, 729 + 27 * 28), (1152, 10, 729 + 81 * 82)):
            n = n_image + 30
            d, m, v = lm["hidden_size"], lm["intermediate_size"], lm["vocab_size"]
            kv = lm["num_key_value_heads"] * d // lm["num_attention_heads"]
            lm_params = v * d + lm["num_hidden_layers"] * (2 * d * d + 2 * d * kv + 3 * d * m)
            vis = SIGLIP_LAYERS * (4 * 1152**2 + 2 * 1152 * 4304) + 1152 * d + d * d
            gb = lambda x: f"{2 * x / 1e9:.1f} GB"  # noqa: E731
            cache = cache_numel(lm, n, SIGLIP_LAYERS, views, n_image)
            print(f"| OneVision-{size} | {side}×{side} | {views} | {n} | {gb(lm_params + vis)} | {gb(cache)} |")


def main() -> None:
    torch.set_num_threads(1)  # a shared machine: one thread, and the same for every variant
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument(
        "--image-size", type=int, default=384, help="side of the square image: 384 is a base view and one tile, "
        "768 a base view and 2 × 2 tiles"
    )  # fmt: skip
    args = parser.parse_args()
    memory()
    if not args.memory_only:
        speed(args)


if __name__ == "__main__":
    main()
