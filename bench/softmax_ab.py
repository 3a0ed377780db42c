"""What the blockwise pattern softmax saves: `run_with_cache` with it against the same call with
HF eager's `F.softmax(scores, dtype=float32).to(dtype)`, on one model, interleaved round by round.

Real width (LLaVA-1.5-7B widths, 2 LM and 2 CLIP layers, random weights), bf16, one image, one thread.
Prints median CPU seconds, the per-round ratio (median [CI of the median]) and minor page faults per call.

    python bench/softmax_ab.py [--rounds 30] [--config real]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import warnings

import harness as h
import torch
import torch.nn.functional as F

from hooked_llava.model import attention


def hf_softmax(scores: torch.Tensor) -> torch.Tensor:
    """HF eager's pattern: a score-sized fp32 copy, a score-sized fp32 softmax, then the cast back."""
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(scores.dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--config", default="real", help="tiny, 17M or real (LLaVA-1.5-7B widths)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(h.machine())
    models = h.build_models(args.config, torch.bfloat16, with_bridge=False)
    inputs = h.make_inputs(models, n_images=1)
    blockwise = attention.softmax_fp32
    faults: dict[str, list[int]] = {"blockwise softmax": [], "HF-style softmax": []}

    def cached(name: str, softmax) -> None:
        attention.softmax_fp32 = softmax
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            cache = models.hooked.run_with_cache(inputs)
        finally:
            attention.softmax_fp32 = blockwise
        faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del cache

    runs = {"blockwise softmax": lambda: cached("blockwise softmax", blockwise)}
    runs["HF-style softmax"] = lambda: cached("HF-style softmax", hf_softmax)
    t = h.interleaved(runs, args.rounds)
    pos = inputs.input_ids.shape[1]
    print(f"\n== default run_with_cache, {args.config}, bf16, {pos} positions, {t.rounds} rounds, 1 thread ==")
    for name in runs:
        print(f"  {name:20s} cpu {statistics.median(t.cpu[name]):.3f} s, {statistics.median(faults[name]):,.0f} faults")
    print(f"  blockwise / HF-style: {h.verdict(t.ratios('blockwise softmax', 'HF-style softmax'), 1.0)}")


if __name__ == "__main__":
    main()
