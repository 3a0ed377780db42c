"""LLaVA-1.5-7B-shaped model on one GPU: time and peak memory of HookedLlava against HF SDPA and eager.

Builds everything from configs with random weights (no network, no downloads), in bf16 at full
depth (32 Llama layers, CLIP ViT-L/336), one image and 616 positions. Variants run one after
another, each timed with CUDA events over interleaved rounds (start rotated each round), and each
measured once more alone for its peak `torch.cuda.max_memory_allocated`. To keep two 7B copies
in memory at once (~28 GB) the HF SDPA and eager models are one model object whose attention
implementation is switched between calls; HookedLlava holds its own copy of the weights.

    python bench/gpu_7b.py [--rounds 5] [--lm-layers 32] [--vision-layers 24]
    python bench/gpu_7b.py --device cpu --tiny      # the CPU-side logic on a tiny model (tests)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from typing import Any

import harness as h
import torch


def require_device(device: str) -> torch.device:
    """The device to run on; fails fast, saying why, when CUDA was asked for and is missing."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(
            "bench/gpu_7b.py needs a CUDA GPU (torch.cuda.is_available() is False). "
            "Run it on a machine with a GPU, or use `--device cpu --tiny` to check the script itself."
        )
    return torch.device(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: CUDA events on a GPU, the wall clock elsewhere."""
    import time

    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    sync(device)
    begin.record()
    fn()
    end.record()
    sync(device)
    return begin.elapsed_time(end) / 1e3


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak allocated bytes during one call, the result kept alive until the peak is read (None off CUDA)."""
    if device.type != "cuda":
        fn()
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return peak


def build(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any, Any]:
    """(HF model, HookedLlava, inputs) on `device`; the HF model is never handed to another tool."""
    from transformers import LlavaForConditionalGeneration

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    name = "tiny" if args.tiny else "real"
    cfg = h.llava_config(name, lm_layers=args.lm_layers, vision_layers=args.vision_layers, sdpa=True)
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    vision = cfg.vision_config
    models = h.Models(hf, hf, None, None, None, h.tiny_processor(vision.image_size, vision.patch_size), 0)
    models.hooked = h.HookedLlava.from_hf(hf, models.processor)
    inputs = h.make_inputs(models, n_images=1).to(device)
    return hf, models.hooked, inputs


def hf_call(hf: Any, kw: dict, attn: str) -> Callable[[], Any]:
    """A forward of `hf` with attention implementation `attn` (switched in place, no copy of the weights)."""

    def call() -> Any:
        if hf.config._attn_implementation != attn:
            hf.set_attn_implementation(attn)
        return hf(**kw).logits

    return call


def gpu_variants(hf: Any, model: Any, inputs: Any, device: torch.device) -> dict[str, Callable[[], Any]]:
    kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    runs = {
        "HF sdpa": hf_call(hf, kw, "sdpa"),
        "HF eager": hf_call(hf, kw, "eager"),
        "HookedLlava forward": lambda: model(inputs),
        "HookedLlava run_with_cache (default)": lambda: model.run_with_cache(inputs),
        "HookedLlava run_with_cache (+hook_result)": lambda: h.with_result(model, inputs),
        "HookedLlava run_with_cache (resid only)": lambda: model.run_with_cache(inputs, names_filter=h.resid_only),
    }
    if device.type == "cuda":
        runs["HookedLlava run_with_cache(device='cpu')"] = lambda: model.run_with_cache(inputs, device="cpu")
    return runs


def supported(name: str, fn: Callable[[], Any]) -> bool:
    """Try a variant once; an unsupported one is reported and skipped, not fatal."""
    try:
        with torch.no_grad():
            fn()
        return True
    except (TypeError, NotImplementedError, RuntimeError) as err:
        print(f"  skipped {name}: {type(err).__name__}: {err}")
        return False


def measure(runs: dict[str, Callable[[], Any]], rounds: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Median seconds over interleaved rounds (rotated start) and peak memory of each variant."""
    runs = {k: fn for k, fn in runs.items() if supported(k, fn)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    with torch.no_grad():
        for r in range(rounds):
            for name in h.rotated(list(runs), r):
                seconds[name].append(timed(runs[name], device))
        peaks = {k: peak_bytes(fn, device) for k, fn in runs.items()}
    return {k: dict(seconds=seconds[k], median=statistics.median(seconds[k]), peak=peaks[k]) for k in runs}


def report(results: dict[str, dict[str, Any]], weights_bytes: int) -> None:
    eager, sdpa = results["HF eager"]["median"], results["HF sdpa"]["median"]
    print(f"  {'variant':44s} {'median s':>9s} {'× eager':>8s} {'× sdpa':>8s} {'peak GiB':>9s}")
    for name, r in results.items():
        peak = "n/a" if r["peak"] is None else f"{r['peak'] / 2**30:.2f}"
        print(f"  {name:44s} {r['median']:9.4f} {r['median'] / eager:8.2f} {r['median'] / sdpa:8.2f} {peak:>9s}")
    print(f"  (weights resident during the peaks: {weights_bytes / 2**30:.2f} GiB — both models' copies)")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny config instead of LLaVA-1.5-7B widths")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lm-layers", type=int, default=32)
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP layers (computed up to layer -2)")
    args = parser.parse_args(argv)
    device = require_device(args.device)
    warnings.filterwarnings("ignore")
    print(h.machine())
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}")
    hf, model, inputs = build(args, device)
    n_weights = sum(p.numel() * p.element_size() for p in [*hf.parameters(), *model.parameters()])
    layers = f"{hf.config.text_config.num_hidden_layers} LM / {hf.config.vision_config.num_hidden_layers} CLIP layers"
    print(
        f"\n== {'tiny' if args.tiny else 'LLaVA-1.5-7B-shaped'}, {args.dtype}, {layers}, "
        f"{inputs.input_ids.shape[1]} positions, {args.rounds} rounds =="
    )
    results = measure(gpu_variants(hf, model, inputs, device), args.rounds, device)
    report(results, n_weights)
    return results


if __name__ == "__main__":
    main()
