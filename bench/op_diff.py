"""Which aten ops the hook-free HookedLlava forward runs that HF SDPA does not, and the FLOPs of each.

Timing cannot settle a few percent on a noisy machine; the work itself can be compared exactly.
Every aten op of one call is recorded (name, input shapes, dtypes) with a `TorchDispatchMode`, and
matmul/attention FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode`. The table lists
the op kinds whose counts differ; if the forward runs no op that HF SDPA does not, with no more
FLOPs, its extra cost can only be Python around the same kernels.

    python bench/op_diff.py [--config real] [--images 5] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import harness as h
import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class OpLog(TorchDispatchMode):
    """Counts every aten op called and the bytes it reads and writes (views move none), keyed by op
    and the shapes and dtypes of its tensor inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        key = (str(func.overloadpacket), " ".join(f"{tuple(t.shape)}:{str(t.dtype)[6:]}" for t in inputs))
        self.calls[key] += 1
        if not func.is_view:
            outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            self.bytes[key] += sum(t.numel() * t.element_size() for t in inputs + outputs)
        return out


def record(fn: Callable[[], Any]) -> tuple[OpLog, int]:
    """The aten calls (with bytes) and total FLOPs of one call of `fn`."""
    log, flops = OpLog(), FlopCounterMode(display=False)
    with torch.no_grad(), flops, log:
        fn()
    return log, flops.get_total_flops()


def compare(ours: OpLog, theirs: OpLog) -> pd.DataFrame:
    """Per op: calls and MB read+written by HF SDPA and by the forward, for the (op, shapes) whose counts differ."""
    keys = [k for k in sorted(set(ours.calls) | set(theirs.calls)) if ours.calls[k] != theirs.calls[k]]
    rows = [
        dict(
            op=k[0],
            inputs=k[1],
            hf_sdpa_calls=theirs.calls[k],
            hooked_calls=ours.calls[k],
            hf_sdpa_mb=theirs.bytes[k] / 2**20,
            hooked_mb=ours.bytes[k] / 2**20,
        )
        for k in keys
    ]
    return pd.DataFrame(rows, columns=["op", "inputs", "hf_sdpa_calls", "hooked_calls", "hf_sdpa_mb", "hooked_mb"])


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="real", help="tiny, 17M or real (LLaVA-1.5-7B widths)")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    models = h.build_models(args.config, DTYPES[args.dtype], with_bridge=False)
    inputs = h.make_inputs(models, n_images=args.images)
    runs = h.variants(models, inputs, extra=False)
    theirs, their_flops = record(runs["HF sdpa"])
    ours, our_flops = record(runs["HookedLlava forward"])
    diff = compare(ours, theirs)
    pos = inputs.input_ids.shape[1]
    gb = lambda log: sum(log.bytes.values()) / 2**30  # noqa: E731
    print(f"== {args.config}, {args.dtype}, {args.images} image(s), {pos} positions ==")
    print(f"  aten calls:  HF sdpa {sum(theirs.calls.values()):,}, HookedLlava forward {sum(ours.calls.values()):,}")
    print(
        f"  FLOPs:       HF sdpa {their_flops:.4g}, HookedLlava forward {our_flops:.4g} "
        f"({our_flops / their_flops:.4f}×)"
    )
    print(
        f"  GiB read+written by non-view ops: HF sdpa {gb(theirs):.3f}, HookedLlava forward {gb(ours):.3f} "
        f"({gb(ours) / gb(theirs):.4f}×)"
    )
    print("  ops whose calls differ, summed over their input shapes (MB read+written):")
    cols = ["hf_sdpa_calls", "hooked_calls", "hf_sdpa_mb", "hooked_mb"]
    with pd.option_context("display.width", 200, "display.max_rows", 200, "display.float_format", "{:.1f}".format):
        print(diff.groupby("op")[cols].sum().to_string())
    return diff


if __name__ == "__main__":
    main()
