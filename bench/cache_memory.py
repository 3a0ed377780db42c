"""Bytes held by a HookedLlava `run_with_cache`: per hook family, per LM and CLIP layer, extrapolated.

Measures a real `run_with_cache` of the reduced-depth model at LLaVA-1.5-7B widths (one image,
616 positions), accounts every cached tensor (`cache_table`), and extrapolates each tensor to
full-depth LLaVA-1.5-7B, 1.5-13B and LLaVA-NeXT-7B by naming each of its dimensions
(`symbolic_shape`) and substituting the target model's sizes. Whatever hook set the model has is
measured; `hook_result` is reported apart so that making it opt-in shows.

    python bench/cache_memory.py [--dtype bf16] [--lm-layers 2] [--vision-layers 2]
"""

from __future__ import annotations

import argparse
import math
import re
import warnings
from typing import Any

import harness as h
import pandas as pd
import torch

MiB, GB = 2**20, 1e9
LM_HOOK = re.compile(r"^blocks\.(\d+)\.(.+)$")
VISION_HOOK = re.compile(r"^vision\.blocks\.(\d+)\.(.+)$")
KV_FAMILIES = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")  # these have n_kv_heads heads

# Sizes by part: "lm" for language-model tensors, "vision" for CLIP, "projector" for the projector.
LLAMA_7B = dict(pos=616, d_model=4096, heads=32, kv_heads=32, d_head=128, d_mlp=11008, vocab=32064)
CLIP_L336 = dict(pos=577, patches=576, d_model=1024, heads=16, kv_heads=16, d_head=64, d_mlp=4096)
TARGETS: dict[str, dict[str, Any]] = {
    "LLaVA-1.5-7B": dict(lm=LLAMA_7B, lm_layers=32, vision=CLIP_L336, vision_layers=23, tiles=1),
    "LLaVA-1.5-13B": dict(
        lm=dict(LLAMA_7B, d_model=5120, heads=40, kv_heads=40, d_mlp=13824),
        lm_layers=40,
        vision=CLIP_L336,
        vision_layers=23,
        tiles=1,
    ),
    "LLaVA-NeXT-7B (Vicuna)": dict(
        lm=dict(LLAMA_7B, pos=2928), lm_layers=32, vision=CLIP_L336, vision_layers=23, tiles=5
    ),
    "LLaVA-NeXT-7B (Mistral)": dict(
        lm=dict(LLAMA_7B, pos=2928, kv_heads=8, d_mlp=14336),
        lm_layers=32,
        vision=CLIP_L336,
        vision_layers=23,
        tiles=5,
    ),
}


def split_name(name: str) -> tuple[str, int | None, str]:
    """(part, layer, family) of a hook name: "blocks.3.attn.hook_q" → ("lm", 3, "attn.hook_q")."""
    if m := VISION_HOOK.match(name):
        return "vision", int(m[1]), m[2]
    if m := LM_HOOK.match(name):
        return "lm", int(m[1]), m[2]
    if name.startswith("vision."):
        return "vision", None, name.removeprefix("vision.")
    if name.startswith("projector."):
        return "projector", None, name.removeprefix("projector.")
    return "lm", None, name


def cache_table(cache: Any) -> pd.DataFrame:
    """One row per cached tensor: hook, part, layer, family, shape, dtype and nbytes."""
    rows = []
    for name, t in dict(cache.items()).items():
        part, layer, family = split_name(name)
        rows.append(
            dict(
                hook=name,
                part=part,
                layer=layer,
                family=family,
                shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
                nbytes=t.numel() * t.element_size(),
            )
        )
    return pd.DataFrame(rows).astype({"layer": "Int64"})


def symbolic_shape(shape: tuple[int, ...], sizes: dict[str, int], family: str) -> tuple[str | int, ...]:
    """Name each dimension of a cached tensor: the first is the batch (images/tiles for the vision tower),
    the others are looked up by value in `sizes`; 1 stays 1. Ambiguous or unknown sizes are an error."""
    out: list[str | int] = ["batch"]
    for n in shape[1:]:
        names = {k for k, v in sizes.items() if v == n}
        if family in KV_FAMILIES and names & {"heads", "kv_heads"}:
            names = {"kv_heads"}  # keys and values have n_kv_heads heads, even when it equals n_heads
        names.discard("heads" if family in KV_FAMILIES else "kv_heads")
        if n == 1:
            out.append(1)
        elif len(names) != 1:
            raise ValueError(
                f"{family}: size {n} of shape {shape} matches {sorted(names) or 'no size'} in {sizes}; "
                "measure on a configuration whose sizes are all distinct."
            )
        else:
            out.append(names.pop())
    return tuple(out)


def measured_sizes(cfg: Any, positions: int) -> dict[str, dict[str, int]]:
    """The sizes of the measured model, by part, for `symbolic_shape`."""
    t, v = cfg.text_config, cfg.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    lm = dict(
        pos=positions,
        d_model=t.hidden_size,
        heads=t.num_attention_heads,
        kv_heads=t.num_key_value_heads,
        d_head=t.hidden_size // t.num_attention_heads,
        d_mlp=t.intermediate_size,
        vocab=t.vocab_size,
    )
    heads = v.num_attention_heads
    vision = dict(
        pos=patches + 1,
        patches=patches,
        d_model=v.hidden_size,
        heads=heads,
        kv_heads=heads,
        d_head=v.hidden_size // heads,
        d_mlp=v.intermediate_size,
    )
    projector = dict(patches=patches, d_in=v.hidden_size, d_model=t.hidden_size)
    return dict(lm=lm, vision=vision, projector=projector)


def target_sizes(target: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Sizes by part of a target model, with the batch dimension each part has for one prompt."""
    lm, vision = target["lm"], target["vision"]
    return dict(
        lm=dict(lm, batch=1),
        vision=dict(vision, batch=target["tiles"]),
        projector=dict(patches=vision["patches"], d_in=vision["d_model"], d_model=lm["d_model"], batch=target["tiles"]),
    )


def extrapolate(table: pd.DataFrame, measured: dict[str, dict[str, int]], target: dict[str, Any]) -> pd.DataFrame:
    """The target model's cache, one row per family and part: bytes of one layer's tensor rescaled by its
    named dimensions, times the target's layer count (1 for hooks outside the blocks)."""
    sizes = target_sizes(target)
    layers = dict(lm=target["lm_layers"], vision=target["vision_layers"])
    first = table[table.layer.isna() | (table.layer == table.groupby("part").layer.transform("min"))]
    rows = []
    for r in first.itertuples():
        dims = symbolic_shape(r.shape, measured[r.part], r.family)
        elements = math.prod(d if isinstance(d, int) else sizes[r.part][d] for d in dims)
        count = 1 if pd.isna(r.layer) else layers[r.part]
        per = elements * r.nbytes // math.prod(r.shape)  # same element size as measured
        rows.append(dict(part=r.part, family=r.family, per_layer=per, layers=count, nbytes=per * count))
    return pd.DataFrame(rows)


def tl3_lm_layer_bytes(pos: int, d_model: int, heads: int, d_mlp: int) -> int:
    """Analytic bytes of one block in a default TL 3 `HookedTransformer.run_with_cache` of a bf16 Llama:
    resid_pre/mid/post, attn_out, mlp_out, q, k, v, rot_q, rot_k, z (bf16), mlp pre/pre_linear/post (bf16),
    attn_scores and pattern in fp32 (TL 3 upcasts q and k of 16-bit models), ln1/ln2 scale and normalized
    in fp32 (its RMSNorm upcasts); no hook_result (opt-in)."""
    bf16 = pos * (11 * d_model + 3 * d_mlp) * 2
    attention = 2 * heads * pos * pos * 4
    norms = 2 * pos * (d_model + 1) * 4
    return bf16 + attention + norms


def summary(table: pd.DataFrame, measured: dict[str, dict[str, int]]) -> pd.DataFrame:
    """Per target model: cache GB of the default hooks, without hook_result, residual only, and TL 3's."""
    rows = []
    for name, target in TARGETS.items():
        ex = extrapolate(table, measured, target)
        lm = target["lm"]
        lm_layer = ex[(ex.part == "lm") & (ex.layers > 1)].per_layer.sum()
        rows.append(
            {
                "model": name,
                "positions": lm["pos"],
                "LM layers": target["lm_layers"],
                "CLIP layers": target["vision_layers"],
                "LM layer MiB": lm_layer / MiB,
                "hook_result share": ex[ex.family == "attn.hook_result"].nbytes.sum() / ex.nbytes.sum(),
                "default GB": ex.nbytes.sum() / GB,
                "no hook_result GB": ex[ex.family != "attn.hook_result"].nbytes.sum() / GB,
                "resid only GB": ex[ex.family.str.startswith("hook_resid_")].nbytes.sum() / GB,
                "TL3 LM layer MiB": tl3_lm_layer_bytes(lm["pos"], lm["d_model"], lm["heads"], lm["d_mlp"]) / MiB,
            }
        )
    return pd.DataFrame(rows)


def per_family(table: pd.DataFrame) -> pd.DataFrame:
    """MiB per layer of each hook family, language model and CLIP side by side."""
    layers = table[table.layer.notna()]
    per = layers.groupby(["family", "part"]).nbytes.mean().unstack("part").fillna(0) / MiB
    per.loc["total per layer"] = per.sum()
    return per


def measure(dtype: torch.dtype, lm_layers: int, vision_layers: int) -> tuple[pd.DataFrame, dict, int]:
    """Cache table of one `run_with_cache` (default hooks) at real width, one image."""
    models = h.build_models("real", dtype, with_bridge=False, lm_layers=lm_layers, vision_layers=vision_layers)
    inputs = h.make_inputs(models, n_images=1)
    with torch.no_grad():
        _, cache = models.hooked.run_with_cache(inputs)
    positions = inputs.input_ids.shape[1]
    return cache_table(cache), measured_sizes(models.eager.config, positions), positions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--lm-layers", type=int, default=2)
    parser.add_argument("--vision-layers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    print(h.machine())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    table, measured, positions = measure(dtype, args.lm_layers, args.vision_layers)
    print(
        f"\n== cache of one run_with_cache at real width, {positions} positions, {args.dtype}: "
        f"{table.nbytes.sum() / MiB:.0f} MiB in {len(table)} tensors =="
    )
    print("\nMiB per layer, by hook family:")
    print(h.markdown(per_family(table), digits=1))
    outside = table[table.layer.isna()]
    print(f"\nOutside the blocks: {outside.nbytes.sum() / MiB:.1f} MiB ({', '.join(outside.hook)})")
    print("\nExtrapolated to full depth (one prompt, batch 1):")
    print(h.markdown(summary(table, measured), index=False))


if __name__ == "__main__":
    main()
