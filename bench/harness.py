"""Shared set-up and timing for the benchmarks in `bench/`.

Builds the models that are compared side by side so that every baseline is pristine: the HF
eager and HF SDPA models and the TransformerBridge's own HF model are separate objects (weights
copied, never modules shared), and nothing but the bridge itself ever touches the bridge's model.
Times variants interleaved round by round in one process with the starting variant rotated each
round (or each compared pair back to back, in alternating order), recording CPU time
(`time.process_time`) and wall time of every call; `median_ci` and `verdict` judge a target from the
per-round ratios.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# `python bench/x.py` puts bench/ first on the path, so without this the installed hooked_llava
# (possibly another checkout's) would be measured instead of this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hooked_llava import HookedLlava  # noqa: E402
from hooked_llava.testing import random_images, tiny_llava_config, tiny_processor  # noqa: E402

# LLaVA-1.5-7B widths: CLIP ViT-L/14-336 (576 patches) and a Vicuna/Llama-7B language model.
REAL_WIDTH = dict(
    vocab_size=32064,
    d_model=4096,
    d_mlp=11008,
    n_heads=32,
    n_kv_heads=None,
    vision_d_model=1024,
    vision_d_mlp=4096,
    image_size=336,
    patch_size=14,
    max_position_embeddings=4096,
)
REAL_VISION_HEADS = 16
SMALL_CONFIGS = {
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
# With the test tokenizer one image (576 patches) gives 616 positions, LLaVA-1.5's usual length.
QUESTION = (
    "What is the color of the circle on the left of the picture ? Is there a square or circle on the right side "
    "of this image ? Which shape is on the left ?"
)


def llava_config(name: str, lm_layers: int = 2, vision_layers: int = 2, sdpa: bool = False) -> Any:
    """A `LlavaConfig`: "tiny", "17M" or "real" (LLaVA-1.5-7B widths at reduced depth)."""
    attn = "sdpa" if sdpa else "eager"
    if name in SMALL_CONFIGS:
        return tiny_llava_config(**SMALL_CONFIGS[name], attn_implementation=attn)
    if name != "real":
        raise ValueError(f"unknown config {name!r}; use one of {[*SMALL_CONFIGS, 'real']}.")
    cfg = tiny_llava_config(**REAL_WIDTH, n_layers=lm_layers, vision_layers=vision_layers, attn_implementation=attn)
    cfg.vision_config.num_attention_heads = REAL_VISION_HEADS  # tiny_llava_config fixes 4 heads
    return cfg


def prompt(n_images: int) -> str:
    """A chat prompt with `n_images` image placeholders and the benchmark question."""
    return "USER: " + "<image>\n" * n_images + QUESTION + "\nASSISTANT:"


@dataclass
class Models:
    """The models compared side by side, each its own object."""

    eager: Any
    sdpa: Any
    hooked: Any
    bridge: Any | None
    bridge_hf: Any | None
    processor: Any
    n_params: int

    def hf_baselines(self) -> dict[str, Any]:
        """The HF models timed as baselines (the bridge's own HF model is not one of them)."""
        return {"HF eager": self.eager, "HF sdpa": self.sdpa}


def _hf_model(cfg: Any, dtype: torch.dtype, state: dict | None = None) -> Any:
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(cfg).to(dtype).eval()
    if state is not None:
        model.load_state_dict(state)  # copies the values into this model's own tensors
    return model


def build_models(
    name: str,
    dtype: torch.dtype = torch.float32,
    with_bridge: bool = True,
    lm_layers: int = 2,
    vision_layers: int = 2,
    seed: int = 0,
) -> Models:
    """HF eager, HF SDPA, HookedLlava and (optionally) a TransformerBridge, all on the same weights."""
    torch.manual_seed(seed)
    eager = _hf_model(llava_config(name, lm_layers, vision_layers), dtype)
    state = eager.state_dict()
    sdpa = _hf_model(llava_config(name, lm_layers, vision_layers, sdpa=True), dtype, state)
    vision = eager.config.vision_config
    processor = tiny_processor(vision.image_size, vision.patch_size)
    hooked = HookedLlava.from_hf(eager, processor)
    bridge, bridge_hf = None, None
    if with_bridge:
        bridge_hf = _hf_model(llava_config(name, lm_layers, vision_layers), dtype, state)
        bridge = boot_bridge(bridge_hf, processor, dtype)
    n_params = sum(p.numel() for p in eager.parameters())
    return Models(eager, sdpa, hooked, bridge, bridge_hf, processor, n_params)


def boot_bridge(own_hf: Any, processor: Any, dtype: torch.dtype) -> Any | None:
    """A TransformerBridge booted on `own_hf`, a model no other variant uses (the bridge edits it
    in place). Only the config and processor are saved, so it boots offline without re-reading weights."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    path = tempfile.mkdtemp(prefix="bench-bridge-")
    own_hf.config.architectures = [type(own_hf).__name__]  # the bridge picks its adapter from this
    own_hf.config.save_pretrained(path)
    processor.save_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        return TransformerBridge.boot_transformers(
            path, hf_model=own_hf, tokenizer=tokenizer, device="cpu", dtype=dtype
        )
    except Exception as err:  # report, but keep measuring the rest
        print(f"  TransformerBridge could not be built: {type(err).__name__}: {err}")
        return None


def make_inputs(models: Models, n_images: int = 1, batch: int = 1) -> Any:
    """Inputs of `batch` prompts, each with `n_images` random images, in the model's dtype."""
    size = models.eager.config.vision_config.image_size
    images = random_images(n_images * batch, size)  # flat: the processor fills the placeholders in order
    inputs = models.hooked.prepare(images=images, prompts=[prompt(n_images)] * batch)
    dtype = next(models.eager.parameters()).dtype
    return inputs if inputs.pixel_values is None else _with_pixels(inputs, inputs.pixel_values.to(dtype))


def _with_pixels(inputs: Any, pixel_values: torch.Tensor) -> Any:
    import dataclasses

    return dataclasses.replace(inputs, pixel_values=pixel_values)


@dataclass
class Timings:
    """Per-round CPU and wall seconds of each variant, from `interleaved`."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    wall: dict[str, list[float]] = field(default_factory=dict)
    orders: list[list[str]] = field(default_factory=list)

    @property
    def rounds(self) -> int:
        return len(self.orders)

    def ratios(self, variant: str, baseline: str, clock: str = "cpu") -> list[float]:
        """Per-round ratios `variant / baseline` (each round's two calls were made side by side)."""
        times = getattr(self, clock)
        return [v / b for v, b in zip(times[variant], times[baseline], strict=True)]

    def summary(self, variant: str, baseline: str, clock: str = "cpu") -> tuple[float, float, float]:
        """Median, min and max of the per-round ratios."""
        r = self.ratios(variant, baseline, clock)
        return statistics.median(r), min(r), max(r)


def rotated(names: list[str], round_index: int) -> list[str]:
    """The call order of one round: start at variant `round_index mod n`, keep the cyclic order."""
    k = round_index % len(names)
    return names[k:] + names[:k]


def paired(names: list[str], pairs: list[tuple[str, str]], round_index: int) -> list[str]:
    """The call order of one round in which each compared pair is called back to back: the pairs
    in rotated order, each pair's two calls swapped every `len(pairs)` rounds, then the other
    variants, rotated. (On this machine a slow spell lasts about one call: the CPU times of
    consecutive calls correlate at 0.5, of calls two apart at 0.24, so neighbours compare best.)"""
    swap = (round_index // len(pairs)) % 2
    order = [n for pair in rotated(list(pairs), round_index) for n in (pair[::-1] if swap else pair)]
    rest = [n for n in names if n not in order]
    return order + rotated(rest, round_index) if rest else order


def release_free_memory() -> None:
    """Give the C heap's free memory back to the OS (glibc `malloc_trim(0)`), so that the next call
    touches fresh pages for everything it allocates, whatever the call before it freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def interleaved(
    runs: dict[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    pairs: list[tuple[str, str]] = (),
    cold: bool = False,
) -> Timings:
    """Call every variant once per round, starting each round at the next variant, or with `pairs`
    each compared pair back to back (see `paired`).

    Results are dropped right after each call so that one variant's cache never holds memory
    while another runs. By default a call may reuse heap memory that the call before it freed (the
    steady state of a loop of calls); `cold=True` returns it to the OS before every call
    (`release_free_memory`, untimed), so each call pays the page faults of all it allocates.
    """
    names = list(runs)
    out = Timings({n: [] for n in names}, {n: [] for n in names})
    with torch.no_grad():
        for _ in range(warmup):
            for fn in runs.values():
                fn()
        for r in range(rounds):
            order = paired(names, list(pairs), r) if pairs else rotated(names, r)
            out.orders.append(order)
            for name in order:
                if cold:
                    release_free_memory()
                cpu, wall = time.process_time(), time.perf_counter()
                result = runs[name]()
                out.cpu[name].append(time.process_time() - cpu)
                out.wall[name].append(time.perf_counter() - wall)
                del result
    return out


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median: the order statistics `x_(j)` and
    `x_(n+1-j)` for the largest `j` whose coverage `P(j <= Binomial(n, 1/2) <= n-j)` is at least
    `level`. Returns `(low, high, coverage)`; with too few values for `level` it is `(min, max)` and
    the smaller coverage that has."""
    x, n = sorted(values), len(values)
    coverage = lambda j: sum(math.comb(n, i) for i in range(j, n - j + 1)) / 2**n  # noqa: E731
    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return x[j - 1], x[n - j], coverage(j)


def verdict(values: list[float], target: float, level: float = 0.95) -> str:
    """The median and CI of per-round ratios against a target, and whether it is met, not met or not settled."""
    low, high, cov = median_ci(values, level)
    word = "met" if high <= target else "not met" if low > target else "not settled (the interval spans it)"
    return f"{statistics.median(values):.3f} [{low:.3f}–{high:.3f}, {cov:.0%} CI of the median] ≤ {target:.2f}: {word}"


def fmt_ratio(stats: tuple[float, float, float]) -> str:
    med, lo, hi = stats
    return f"{med:.2f} [{lo:.2f}–{hi:.2f}]"


def print_table(t: Timings, baselines: tuple[str, str] = ("HF eager", "HF sdpa")) -> None:
    """Median CPU and wall seconds and per-round CPU-time ratios to each baseline."""
    head = f"  {'variant':40s} {'cpu s':>8s} {'wall s':>8s}"
    print(head + "".join(f"   {'cpu ×' + b:>22s}" for b in baselines) + f"   {'wall ×' + baselines[0]:>22s}")
    for name in t.cpu:
        row = f"  {name:40s} {statistics.median(t.cpu[name]):8.3f} {statistics.median(t.wall[name]):8.3f}"
        row += "".join(f"   {fmt_ratio(t.summary(name, b)):>22s}" for b in baselines)
        print(row + f"   {fmt_ratio(t.summary(name, baselines[0], 'wall')):>22s}")


def resid_only(name: str) -> bool:
    """names_filter of a residual-stream-only cache (language model and vision tower)."""
    return "hook_resid_" in name


def no_result(name: str) -> bool:
    """names_filter of every hook except the per-head `hook_result` (opt-in in TransformerLens)."""
    return not name.endswith("hook_result")


def with_result(model: Any, inputs: Any) -> Any:
    """Every hook, the opt-in per-head `hook_result` included (`set_use_attn_result(True)`, restored after)."""
    with model.hook_switches(use_attn_result=True):
        return model.run_with_cache(inputs)


def variants(models: Models, inputs: Any, extra: bool = True) -> dict[str, Callable[[], Any]]:
    """The calls compared: HF eager and SDPA forwards, HookedLlava forward and caches, the bridge's.

    "default" caches every hook that fires by default (`hook_result` is opt-in, as in TransformerLens);
    `extra` adds the cache with `hook_result` switched on, the residual-only cache and the bridge's calls.
    """
    kw = dict(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
    m = models
    runs: dict[str, Callable[[], Any]] = {
        "HF eager": lambda: m.eager(**kw).logits,
        "HF sdpa": lambda: m.sdpa(**kw).logits,
        "HookedLlava forward": lambda: m.hooked(inputs),
        "HookedLlava run_with_cache (default)": lambda: m.hooked.run_with_cache(inputs),
    }
    if not extra:
        return runs
    runs["HookedLlava run_with_cache (+hook_result)"] = lambda: with_result(m.hooked, inputs)
    runs["HookedLlava run_with_cache (resid only)"] = lambda: m.hooked.run_with_cache(inputs, names_filter=resid_only)
    if m.bridge is not None:
        bkw = dict(pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)
        runs["Bridge forward"] = lambda: m.bridge(inputs.input_ids, **bkw)
        runs["Bridge run_with_cache"] = lambda: m.bridge.run_with_cache(inputs.input_ids, **bkw)
    return runs


def foreign_modules(model: Any) -> list[str]:
    """Submodules whose class comes from neither `transformers` nor `torch` (empty for a pristine HF model:
    TransformerBridge swaps in its own classes in place)."""
    return [
        f"{n or '<root>'}: {type(mod).__module__}.{type(mod).__qualname__}"
        for n, mod in model.named_modules()
        if not type(mod).__module__.startswith(("transformers.", "torch."))
    ]


def machine() -> str:
    """CPU model, its bf16/AMX/AVX-512 flags, threads and library versions, for the results header."""
    import platform
    import subprocess
    from importlib.metadata import version

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = [f for f in info.get("Flags", "").split() if f.startswith(("amx", "avx512_bf16", "avx512f", "avx2"))]
    import hooked_llava

    return (
        f"hooked_llava from {Path(hooked_llava.__file__).parent}\n"
        f"CPU: {info.get('Model name', '?').strip()} ({info.get('CPU(s)', '?').strip()} CPUs; "
        f"flags: {' '.join(flags)})\n"
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}, "
        f"transformer-lens {version('transformer-lens')}; torch threads {torch.get_num_threads()}"
    )


def markdown(df: Any, index: bool = True, digits: int = 2) -> str:
    """A pandas DataFrame as a Markdown table (no `tabulate` needed)."""
    frame = df.reset_index() if index else df
    cell = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
