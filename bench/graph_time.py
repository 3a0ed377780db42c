"""Time one attribution graph for a `shapes-llava` colour question with the shipped transcoders.

Every active feature is a node (no `max_feature_nodes` cap) unless `--max-feature-nodes` is given.
Reports the wall-clock and process CPU time of `attribute` alone (the model and transcoders are loaded
and warmed up first), the graph's size, and the machine. With `--through-vision` the graph continues
through the projector and the vision tower (`attribute_through_vision` with the shipped vision transcoders).
Run: `python bench/graph_time.py [--threads 1] [--repeats 3] [--max-feature-nodes N] [--through-vision]`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from functools import partial
from typing import Any

import torch

from analyses.graphs import attribute, attribute_through_vision, graph_scores
from hooked_llava import HookedLlava
from hooked_llava.shapes import ShapesWorld
from hooked_llava.transcoders import load_transcoders


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--through-vision", action="store_true", help="continue through the projector and vision tower")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = HookedLlava.from_pretrained("shapes-llava")
    ts = load_transcoders("shapes-llava")
    build: Any = attribute
    if a.through_vision:
        build = partial(attribute_through_vision, vision_ts=load_transcoders("shapes-llava-vision"))
    example = ShapesWorld(7).example(3, "Colour")
    inputs = model.prepare(images=[example.image], prompts=[example.prompt])
    build(model, inputs, ts, max_feature_nodes=64)  # warm-up
    walls, cpus = [], []
    for _ in range(a.repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        graph = build(model, inputs, ts, max_feature_nodes=a.max_feature_nodes)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    replacement, completeness = graph_scores(graph)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{a.threads} thread(s)"
    )
    print(f"prompt: {example.prompt!r} → {example.answer}")
    n_active = len(graph.active_features) + len(graph.vision_active_features)
    print(
        f"graph: {graph.n_features} feature nodes of {n_active} active, {graph.n_nodes} nodes, "
        f"{graph.n_logits} logit target(s); replacement {replacement:.3f}, completeness {completeness:.3f}"
    )
    print(
        f"attribute: wall median {statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f}), "
        f"CPU median {statistics.median(cpus):.1f} s over {a.repeats} runs"
    )
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


if __name__ == "__main__":
    main()
