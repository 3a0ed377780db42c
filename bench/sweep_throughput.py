"""Benchmark: study B's sweep throughput on Ray with 1 and 2 workers, and the projected cost of the
full GQA sweep on LLaVA-1.5-7B on N GPUs.

Measured here: examples per minute of the shipped Shapes LLaVA (8 layers) with the six
flows of study B and window 9, in one process and over 1 and 2 Ray workers (each an actor with one
torch thread, started on a local cluster of this machine's CPUs; actor start-up is timed apart), and
the time of one plain forward, so that the sweep's cost per example is also given in forwards.
On a machine whose cores other jobs share, 1 and 2 workers compete with them: read the load average.

Projected (printed as arithmetic, with its assumptions): the full sweep is 5,525 GQA questions
(METHODS.md §3) × 6 flows. Per example the sweep costs one prediction forward plus one knockout
configuration per flow and layer, 1 + 6 × 32 = 193 forward-equivalents on the 7B (an upper bound:
`knockout_sweep` recomputes only positions from the first blocked query on). The cost of one 7B
forward is an assumption given by --forward-7b-s, not a measurement: no GPU is used here.

Usage:
    python bench/sweep_throughput.py [--per-category 3] [--forward-7b-s 0.06] [--gpus 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import torch

from analyses.information_flow.ray_sweep import RaySweepPool
from analyses.information_flow.sweep import run_sweep, shapes_examples
from hooked_llava import HookedLlava

FLOWS = ["question->last", "image->last", "image->question", "last->last", "related->question", "other->question"]
GQA_QUESTIONS = 1000 + 1000 + 964 + 570 + 991 + 1000  # METHODS.md §3, six categories
LAYERS_7B = 32


def single_process(examples, out) -> float:
    """Seconds for the sweep in this process (one torch thread), model load excluded."""
    model = HookedLlava.from_pretrained("shapes-llava")
    start = time.perf_counter()
    run_sweep(model, examples, out, flows=FLOWS, progress=False)
    return time.perf_counter() - start


def on_ray(examples, out, workers) -> tuple[float, float]:
    """(start-up seconds until every actor holds its model, sweep seconds) with `workers` actors."""
    start = time.perf_counter()
    with RaySweepPool("shapes-llava", workers=workers) as pool:
        pool.pids()  # every actor has loaded its model
        ready = time.perf_counter()
        pool.sweep(examples, out, flows=FLOWS, progress=False)
        return ready - start, time.perf_counter() - ready


def forward_seconds(repeats: int = 20) -> tuple[float, int]:
    """Median seconds of one plain forward of the Shapes LLaVA on one example (one thread), and its positions."""
    model = HookedLlava.from_pretrained("shapes-llava")
    ex = shapes_examples(1, seed=1, categories=["Colour"])[0]
    inputs = model.prepare(images=[ex.image], prompts=[ex.prompt])
    times = []
    with torch.no_grad():
        model(inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            model(inputs)
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], int(inputs.input_ids.shape[1])


def projection(args, measured_fwd: float, n_layers: int) -> list[str]:
    """The markdown lines of the projected 7B sweep on N GPUs (arithmetic on an assumed forward cost)."""
    forwards = 1 + len(FLOWS) * LAYERS_7B
    formula_here = 1 + len(FLOWS) * n_layers
    ratio = measured_fwd / formula_here
    example_s = forwards * args.forward_7b_s
    total_h = GQA_QUESTIONS * example_s / 3600
    lines = [
        f"- forwards per example on the 7B: 1 + {len(FLOWS)} flows × {LAYERS_7B} layers = **{forwards}** "
        "(the study's count: a full forward per configuration)",
        f"- one 7B forward (~640 positions, bf16): **{args.forward_7b_s} s — an assumption**, not measured here",
        f"- per example: {forwards} × {args.forward_7b_s} s = {example_s:.1f} s; × {GQA_QUESTIONS} questions "
        f"= **{total_h:.1f} GPU-hours** (every question swept; only correctly answered ones are, so an upper bound)",
        f"- measured here: the sweep costs {measured_fwd:.0f} plain forwards per example on the {n_layers}-layer "
        f"Shapes model, where the count above gives {formula_here} ({ratio:.0%}: `knockout_sweep` recomputes only "
        f"the positions after the first blocked query). At that ratio (not measured on the 7B): "
        f"{total_h * ratio:.1f} GPU-hours",
        "- N GPUs, one Ray worker each: the examples are independent and the driver only writes a few "
        "small CSVs per example, so wall-clock hours = GPU-hours / N (projected):",
        "",
        "| GPUs | hours at 193 forwards / example | at the measured ratio |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {total_h / n:.2f} | {total_h * ratio / n:.2f} |" for n in args.gpus]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-category", type=int, default=3, help="Shapes examples per category (7 categories)")
    parser.add_argument("--forward-7b-s", type=float, default=0.06, help="ASSUMED seconds of one 7B forward")
    parser.add_argument("--gpus", default="1,2,4,8,16")
    args = parser.parse_args()
    args.gpus = [int(n) for n in args.gpus.split(",")]
    import ray

    torch.set_num_threads(1)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    examples = shapes_examples(args.per_category, seed=4242)
    with tempfile.TemporaryDirectory() as tmp:
        local = single_process(examples, f"{tmp}/local")
        runs = {n: on_ray(examples, f"{tmp}/ray{n}", n) for n in (1, 2)}
    fwd, positions = forward_seconds()
    n_ex, load = len(examples), os.getloadavg()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.1f} at the end")
    print(f"{n_ex} Shapes examples, {len(FLOWS)} flows, window 9; one plain forward", end=" ")
    print(f"({positions} positions): {fwd * 1000:.1f} ms\n")
    print("| run | start-up | sweep | examples / min | forwards / example |\n| --- | ---: | ---: | ---: | ---: |")
    print(f"| one process (no Ray) | — | {local:.1f} s | {60 * n_ex / local:.0f} | {local / n_ex / fwd:.0f} |")
    for n, (up, took) in runs.items():
        print(f"| Ray, {n} worker{'s' * (n > 1)} | {up:.1f} s | {took:.1f} s | {60 * n_ex / took:.0f} | — |")
    print(f"\n2 workers: {runs[1][1] / runs[2][1]:.2f}× the examples per minute of one\n")
    print("\n".join(projection(args, local / n_ex / fwd, 8)))
    ray.shutdown()


if __name__ == "__main__":
    main()
