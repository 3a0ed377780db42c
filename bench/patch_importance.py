"""Speed of study A's one-pass patch map against patch-by-patch occlusion, side by side.

Two random-weight LLaVA configs built offline with `hooked_llava.testing`:

- "64 patches": 64 px images, patch 8 (an 8x8 grid), a 6-layer LM of width 256.
- "576 patches": 336 px images, patch 14 (LLaVA-1.5's 24x24 grid), a 4-layer LM of width 128.

The vocabulary size sets the cost of the one-pass method's readout (one `W_U` product per
scored vector) against the cost of a forward pass. In LLaVA-1.5-7B a readout costs about 2%
of one token's pass through the 32 blocks (V / (12 L d) = 32000 / (12·32·4096)); the default
`--vocab 512` keeps that proportion for these small LMs. `--vocab 32000` makes the readout
dominate instead (about 2× a token's pass here), which is pessimistic for the one-pass method.
Run: `python bench/patch_importance.py [--vocab 512] [--rounds 3] [--repeats 5] [--batch-size 16]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from analyses.patch_maps.maps import patch_importance
from hooked_llava import HookedLlava
from hooked_llava.testing import random_images, tiny_llava_config, tiny_processor

CONFIGS = {
    "64 patches (64 px / patch 8)": dict(
        image_size=64, patch_size=8, vision_layers=3, vision_d_model=64, d_model=256, n_layers=6, n_heads=8,
        n_kv_heads=8,
    ),
    "576 patches (336 px / patch 14)": dict(
        image_size=336, patch_size=14, vision_layers=3, vision_d_model=64, d_model=128, n_layers=4, n_heads=4,
        n_kv_heads=4,
    ),
}  # fmt: skip
PROMPT = "USER: <image>\nWhat is the color of the circle?\nASSISTANT:"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def build(config: dict, vocab: int) -> HookedLlava:
    """A random-weight model; the context is widened for 576 image tokens (the helper's default is 512)."""
    from transformers import LlavaForConditionalGeneration

    hf_config = tiny_llava_config(vocab_size=vocab, **config)
    hf_config.text_config.max_position_embeddings = 1024
    torch.manual_seed(0)
    hf = LlavaForConditionalGeneration(hf_config).eval()
    return HookedLlava.from_hf(hf, tiny_processor(config["image_size"], config["patch_size"]))


def bench(name: str, config: dict, vocab: int, rounds: int, repeats: int, batch_size: int) -> float:
    """Rounds of (`repeats` one-pass runs, one occlusion run), interleaved so both see the same
    machine load. Prints best (min) and median times; the ratio of the bests is the headline,
    since on a shared machine the minimum is the least disturbed measurement."""
    model = build(config, vocab)
    inputs = model.prepare(images=random_images(1, size=config["image_size"]), prompts=[PROMPT])
    patch_importance(model, inputs, "log_prob_increase")  # warm-up
    one_pass, occlusion = [], []
    for _ in range(rounds):
        one_pass += [seconds(lambda: patch_importance(model, inputs)) for _ in range(repeats)]
        occlusion.append(
            seconds(lambda: patch_importance(model, inputs, "occlusion", batch_size=batch_size, progress=False))
        )
    best = min(occlusion) / min(one_pass)
    median = statistics.median(occlusion) / statistics.median(one_pass)
    print(
        f"{name:32s} seq {inputs.input_ids.shape[1]:4d} | log_prob_increase best {min(one_pass) * 1e3:7.1f} ms, "
        f"median {statistics.median(one_pass) * 1e3:7.1f} ms | occlusion ({inputs.grid_size**2} patches, batch "
        f"{batch_size}) best {min(occlusion) * 1e3:8.1f} ms, median {statistics.median(occlusion) * 1e3:8.1f} ms | "
        f"ratio of bests {best:6.1f}x, of medians {median:6.1f}x"
    )
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=512, help="vocabulary size of the random LMs")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one occlusion run each)")
    parser.add_argument("--repeats", type=int, default=5, help="one-pass runs per round")
    parser.add_argument("--batch-size", type=int, default=16, help="occlusion jobs per forward pass")
    args = parser.parse_args()
    machine = f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    print(f"torch {torch.__version__}, {machine}; vocab {args.vocab}; {args.rounds} rounds")
    for name, config in CONFIGS.items():
        bench(name, config, args.vocab, args.rounds, args.repeats, args.batch_size)


if __name__ == "__main__":
    main()
