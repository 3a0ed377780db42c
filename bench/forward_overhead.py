"""Forward-pass overhead of HookedLlava against HF and TransformerLens' TransformerBridge.

Runs, side by side and interleaved in one process, on the same random weights:
HF eager, HF SDPA, HookedLlava without hooks, HookedLlava.run_with_cache of every hook,
and TransformerBridge forward / run_with_cache. Prints median times and ratios.

    python bench/forward_overhead.py [--reps 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch

from hooked_llava import HookedLlava
from hooked_llava.testing import random_images, tiny_llava_config, tiny_processor

CONFIGS = {
    "tiny": dict(),
    "17M": dict(
        vocab_size=1024,
        d_model=512,
        d_mlp=1408,
        n_layers=4,
        n_heads=8,
        n_kv_heads=None,
        vision_layers=4,
        vision_d_model=256,
        vision_d_mlp=1024,
        image_size=64,
        patch_size=8,
    ),
}
PROMPT = "USER: <image>\nWhat is the color of the circle on the left of the picture?\nASSISTANT:"


def build(name: str):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = tiny_llava_config(**CONFIGS[name])
    eager = LlavaForConditionalGeneration(cfg).eval()
    sdpa_cfg = tiny_llava_config(**CONFIGS[name], attn_implementation="sdpa")
    sdpa = LlavaForConditionalGeneration(sdpa_cfg).eval()
    sdpa.load_state_dict(eager.state_dict())
    processor = tiny_processor(cfg.vision_config.image_size, cfg.vision_config.patch_size)
    model = HookedLlava.from_hf(eager, processor)
    inputs = model.prepare(images=random_images(4, cfg.vision_config.image_size), prompts=[PROMPT] * 4)
    n_params = sum(p.numel() for p in eager.parameters())
    return eager, sdpa, model, processor, inputs, n_params


def bridge_for(eager, processor):
    """TransformerBridge built from the same HF model (saved to a temp dir so it boots offline)."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    path = tempfile.mkdtemp()
    eager.save_pretrained(path)
    processor.save_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)  # the bridge reloads it by its saved path
        return TransformerBridge.boot_transformers(path, hf_model=eager, tokenizer=tokenizer, device="cpu")
    except Exception as err:  # report, but keep measuring the rest
        print(f"  TransformerBridge could not be built: {type(err).__name__}: {err}")
        return None


def variants(eager, sdpa, model, bridge, inputs):
    hf_kwargs = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    runs = {
        "HF eager": lambda: eager(**hf_kwargs).logits,
        "HF sdpa": lambda: sdpa(**hf_kwargs).logits,
        "HookedLlava forward": lambda: model(inputs),
        "HookedLlava run_with_cache (all hooks)": lambda: model.run_with_cache(inputs),
    }
    if bridge is not None:
        runs["Bridge forward"] = lambda: bridge(
            inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask
        )
        runs["Bridge run_with_cache"] = lambda: bridge.run_with_cache(
            inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask
        )
    return runs


def measure(runs: dict, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(reps):
            for name, fn in runs.items():  # interleaved, so drift hits every variant alike
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for name in CONFIGS:
        eager, sdpa, model, processor, inputs, n_params = build(name)
        bridge = bridge_for(eager, processor)
        med = measure(variants(eager, sdpa, model, bridge, inputs), args.reps)
        print(
            f"\n== {name}: {n_params / 1e6:.1f}M parameters, batch {inputs.shape[0]} × {inputs.shape[1]} tokens, "
            f"{args.reps} interleaved reps, {args.threads} threads =="
        )
        for k, v in med.items():
            print(
                f"  {k:42s} {v * 1e3:8.2f} ms   ×{v / med['HF eager']:.2f} HF eager   ×{v / med['HF sdpa']:.2f} HF sdpa"
            )


if __name__ == "__main__":
    main()
