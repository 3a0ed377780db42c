"""Forward-pass and cache overhead of HookedLlava against pristine HF models and TransformerBridge.

Variants, on the same random weights, each on its own model object (see `harness.build_models`):
HF eager, HF SDPA, HookedLlava without hooks, HookedLlava `run_with_cache` (default hooks, without
`hook_result`, residual stream only) and TransformerBridge forward / `run_with_cache`. They are
called interleaved round by round in one process, starting each round at the next variant; the
tables give median CPU and wall seconds and the median [min–max] of the per-round CPU-time ratios.

    python bench/forward_overhead.py [--configs tiny,17M,real] [--dtype bf16] [--rounds 15] [--real-rounds 5]
    python bench/forward_overhead.py --sweep 1,2,3,4,5 --dtype bf16 --real-rounds 3   # images, real width
"""

from __future__ import annotations

import argparse
import gc
import statistics
import warnings

import harness as h
import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def run_config(name: str, args: argparse.Namespace) -> None:
    real = name == "real"
    models = h.build_models(
        name,
        DTYPES[args.dtype],
        with_bridge=not args.no_bridge,
        lm_layers=args.lm_layers,
        vision_layers=args.vision_layers,
    )
    inputs = h.make_inputs(models, n_images=1, batch=1 if real else 4)
    rounds = args.real_rounds if real else args.rounds
    timings = h.interleaved(h.variants(models, inputs), rounds)
    batch, pos = inputs.input_ids.shape
    print(
        f"\n== {name}: {models.n_params / 1e6:.1f}M parameters, {args.dtype}, batch {batch} × {pos} positions, "
        f"{rounds} rounds, {torch.get_num_threads()} thread(s) =="
    )
    h.print_table(timings)
    for baseline in models.hf_baselines().values():  # the acceptance check, at run time as well
        assert not h.foreign_modules(baseline), h.foreign_modules(baseline)[:3]


def run_sweep(images: list[int], args: argparse.Namespace) -> None:
    """Forward and full cache against HF at real width, 1..n images in one prompt."""
    models = h.build_models(
        "real", DTYPES[args.dtype], with_bridge=False, lm_layers=args.lm_layers, vision_layers=args.vision_layers
    )
    print(f"\n== sequence sweep at real width ({models.n_params / 1e6:.0f}M parameters, {args.dtype}) ==")
    print(
        f"  {'images':>6s} {'pos':>5s} {'rounds':>6s}  {'forward cpu × sdpa':>22s}  {'cache cpu × eager':>22s}"
        f"  {'cache cpu × sdpa':>22s}  {'eager s':>8s}  {'sdpa s':>8s}"
    )
    for n in images:
        inputs = h.make_inputs(models, n_images=n)
        t = h.interleaved(h.variants(models, inputs, extra=False), args.real_rounds)
        fwd = h.fmt_ratio(t.summary("HookedLlava forward", "HF sdpa"))
        cache = h.fmt_ratio(t.summary("HookedLlava run_with_cache (default)", "HF eager"))
        cache_sdpa = h.fmt_ratio(t.summary("HookedLlava run_with_cache (default)", "HF sdpa"))
        med = {k: statistics.median(v) for k, v in t.cpu.items()}
        print(
            f"  {n:6d} {inputs.input_ids.shape[1]:5d} {t.rounds:6d}  {fwd:>22s}  {cache:>22s}  {cache_sdpa:>22s}"
            f"  {med['HF eager']:8.2f}  {med['HF sdpa']:8.2f}",
            flush=True,
        )
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,17M,real", help="comma-separated: tiny, 17M, real")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=15, help="rounds for the small configs")
    parser.add_argument("--real-rounds", type=int, default=5, help="rounds at real width")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm-layers", type=int, default=2, help="language-model layers at real width")
    parser.add_argument("--vision-layers", type=int, default=2, help="CLIP layers at real width (computed: up to -2)")
    parser.add_argument("--no-bridge", action="store_true", help="leave out TransformerBridge")
    parser.add_argument("--sweep", default="", help="image counts for the real-width sweep, e.g. 1,2,3,4,5")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(h.machine())
    if args.sweep:
        run_sweep([int(n) for n in args.sweep.split(",")], args)
        return
    for name in args.configs.split(","):
        run_config(name, args)
        gc.collect()


if __name__ == "__main__":
    main()
