"""What activation and attribution patching share: activation names, the pair check, the clean run's
cache, image blocks of the patch grid, and results as tidy DataFrames.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import torch
from jaxtyping import Bool
from torch import Tensor
from transformer_lens import ActivationCache

from analyses import ranges
from hooked_llava import HookedLlava, LlavaInputs

Positions = str | Sequence[int] | Tensor
Metric = Callable[[Tensor], Tensor]
Clean = LlavaInputs | ActivationCache | Mapping[str, Tensor]
# Activation name → hook name inside block l.
ACTIVATIONS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "attn_out": "hook_attn_out",
               "mlp_out": "hook_mlp_out", "z": "attn.hook_z"}  # fmt: skip


def image_blocks(inputs: LlavaInputs, size: int = 2) -> dict[str, Bool[Tensor, "batch pos"]]:
    """Image positions grouped in `size`×`size` blocks of the patch grid, row-major, by label "r{i}c{j}".

    Example:
        >>> blocks = image_blocks(inputs, 2)  # a 4x4 grid gives 4 blocks: r0c0, r0c1, r1c0, r1c1
    """
    rc, size = inputs.patch_rc(), ranges.count(size, "size", 1, inputs.grid_size)
    n = -(-inputs.grid_size // size)
    return {
        f"r{i}c{j}": (rc[..., 0] // size == i) & (rc[..., 1] // size == j) & (rc[..., 0] >= 0)
        for i in range(n)
        for j in range(n)
    }


def check_pair(clean: LlavaInputs, corrupted: LlavaInputs) -> None:
    """Raise a ValueError unless both batches have the same length, padding and image positions.

    Example:
        >>> check_pair(clean, clean.with_pixels(other_pixels))  # passes: only the images differ
    """
    same = clean.shape == corrupted.shape and torch.equal(clean.attention_mask, corrupted.attention_mask)
    if not (same and torch.equal(clean.image_mask, corrupted.image_mask)):
        raise ValueError(
            f"clean {tuple(clean.shape)} and corrupted {tuple(corrupted.shape)} inputs must have the same length, "
            "padding and image positions; use the same prompts, e.g. corrupted = clean.with_pixels(other_pixels)."
        )


def _clean_cache(
    model: HookedLlava, clean: Clean, corrupted: LlavaInputs, names: list[str]
) -> ActivationCache | Mapping[str, Tensor]:
    if not isinstance(clean, LlavaInputs):
        check_cache(clean, corrupted, names)  # an ActivationCache (or dict) of the clean run, as TransformerLens takes
        return clean
    check_pair(clean, corrupted)
    with torch.no_grad():
        return model.run_with_cache(clean, names_filter=names, return_type=None)[1]


def to_frame(
    result: Tensor, axis: str = "pos", inputs: LlavaInputs | None = None, labels: Sequence[str] | None = None
) -> pd.DataFrame:
    """A scalar-metric result `[n_layers, n_index]` as a tidy DataFrame: layer, `axis`, value (+ role, label).

    With `inputs` and a "pos" axis, `role` says what each position is in row 0 (image,
    question, template, last, pad) and `label` names image positions "img r{row}c{col}".

    Example:
        >>> to_frame(patch_residual(model, corrupted, clean, metric), "pos", corrupted)
    """
    n_layers, n_index = result.shape[:2]
    layer, index = (t.flatten().numpy() for t in torch.meshgrid(torch.arange(n_layers), torch.arange(n_index),
                                                                  indexing="ij"))  # fmt: skip
    df = pd.DataFrame({"layer": layer, axis: index, "value": result.reshape(n_layers * n_index).cpu().numpy()})
    if inputs is not None and axis == "pos":
        roles = ["pad"] * n_index
        for role in ("template", "question", "image", "last"):
            roles = [role if m else r for r, m in zip(roles, inputs.mask(role)[0].tolist(), strict=True)]
        rc = inputs.patch_rc()[0].tolist()
        df["role"] = roles * n_layers
        labels = [f"img r{r}c{c}" if r >= 0 else role for (r, c), role in zip(rc, roles, strict=True)]
    if labels is not None:
        df["label"] = list(labels) * n_layers
    return df


def check_cache(clean: ActivationCache | Mapping[str, Tensor], corrupted: LlavaInputs, names: list[str]) -> None:
    """Raise a ValueError unless the clean cache holds `names` for a run of the corrupted inputs' layout:
    a batch dimension, the same batch size and every position (no `pos_slice`). A cache made with
    `pos_slice`, `remove_batch_dim` or another batch would patch the wrong positions or broadcast one
    row into every row.

    Example:
        >>> _, cache = model.run_with_cache(clean, names_filter="blocks.0.hook_resid_pre")
        >>> check_cache(cache, corrupted, ["blocks.0.hook_resid_pre"])  # passes: same batch, every position
    """
    if getattr(clean, "has_batch_dim", True) is False:
        raise ValueError(
            "the clean ActivationCache was made with remove_batch_dim=True; patching needs the batch dimension: "
            "run_with_cache(clean_inputs) without it, or pass the clean LlavaInputs."
        )
    missing = [n for n in names if n not in clean]
    if missing:
        raise ValueError(f"the clean cache lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}; cache those hooks.")
    batch, seq = corrupted.shape
    for name in names:
        shape = tuple(clean[name].shape)
        if shape[:2] != (batch, seq):
            raise ValueError(
                f"the clean cache's {name} has shape {shape}, but the corrupted inputs are [batch={batch}, pos={seq}]: "
                "cache the clean run of the same prompts (same batch size, no pos_slice, no remove_batch_dim), "
                "e.g. model.run_with_cache(clean_inputs), or pass the clean LlavaInputs."
            )
