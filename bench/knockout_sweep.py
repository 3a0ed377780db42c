"""Benchmark: `knockout_sweep` against the naive loop of the study's code.

The naive loop runs one full forward per configuration (vision tower included), i.e. it calls
`knockout` for every flow × plotted layer (here batched over the examples, which is kinder
to it than the study's one-example-at-a-time loop). Both run side by side on the same random
narrow model with 32 language-model layers (the depth of 7B models), and the script checks
that they give the same probabilities.

Usage:
    python bench/knockout_sweep.py [--examples 4] [--repeats 3] [--threads N] [--per-example]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from analyses.information_flow.attention_knockout import knockout, knockout_sweep
from analyses.information_flow.flows import resolve_flows, window_layers
from hooked_llava.testing import random_images, tiny_model

FLOWS = ["question->last", "image->last", "image->question"]
QUESTIONS = ["What is the color of the circle?", "Is the square red or blue?", "Which shape is on the left?"]


def naive(model, inputs, flows, window, per_example):
    """The study's loop: one full forward per flow × layer (× example with `per_example`)."""
    rows = [inputs[i] for i in range(len(inputs))] if per_example else [inputs]
    probs = []
    with torch.no_grad():
        for batch in rows:
            answer = model(batch)[torch.arange(len(batch)), batch.last].argmax(-1)
            for source, target in resolve_flows(flows).values():
                for layer in range(model.cfg.n_layers):
                    logits = knockout(model, batch, source, target, window_layers(layer, model.cfg.n_layers, window))
                    p = logits[torch.arange(len(batch)), batch.last].float().softmax(-1)
                    probs.append(p[torch.arange(len(batch)), answer])
    return probs


def timed(fns, repeats):
    """Median and minimum seconds of each function, runs interleaved (fair under background load)."""
    outs = [fn() for fn in fns]  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
    return [(statistics.median(ts), min(ts)) for ts in times], outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-example", action="store_true", help="naive loop one example at a time, as the study")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = tiny_model(seed=0, n_layers=32, d_model=64, n_heads=4, n_kv_heads=4, image_size=64, patch_size=8)
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.examples)]
    inputs = model.prepare(images=random_images(args.examples, size=64, seed=0), questions=questions)
    n_configs = len(FLOWS) * model.cfg.n_layers * args.examples
    threads = torch.get_num_threads()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, {threads} torch threads, torch {torch.__version__}"
    )
    print(f"model: 32 LM layers, d_model 64, 4 heads; vision 3 layers; {inputs.shape[1]} positions (64 image tokens)")
    print(f"{args.examples} examples × {len(FLOWS)} flows × 32 layers = {n_configs} configurations, window 9")

    def sweep():
        return knockout_sweep(model, inputs, FLOWS, window=9, batch_size=args.batch_size, progress=False)

    (t_sweep, t_naive), (df, probs) = timed([sweep, lambda: naive(model, inputs, FLOWS, 9, args.per_example)],
                                            args.repeats)  # fmt: skip
    flat = torch.cat(probs) if not args.per_example else torch.stack(probs).reshape(args.examples, -1).T.reshape(-1)
    diff = (torch.tensor(df.p_blocked.to_numpy()) - flat.double()).abs().max()
    print(f"knockout_sweep: {t_sweep[0]:.3f} s (min {t_sweep[1]:.3f})   naive loop: {t_naive[0]:.3f} s "
          f"(min {t_naive[1]:.3f})   median of {args.repeats}, interleaved")  # fmt: skip
    print(f"speed-up: {t_naive[0] / t_sweep[0]:.2f}x (medians), {t_naive[1] / t_sweep[1]:.2f}x (minima)   "
          f"max |p_blocked difference|: {diff:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
