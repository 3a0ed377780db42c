"""Ground-truth interpretability score of SAE features on the Shapes world's image patches.

The Shapes world knows which object covers each patch (`ShapesWorld.object_patches`), so every
patch has ground-truth attributes: object present, its colour, its shape and its side of the
picture. A unit (SAE feature, neuron, or random direction) "fires" on a patch when its value
exceeds a threshold; its precision and recall against each attribute say how well it detects it.

- SAE features fire when active (> 0): the SAE's own sparse code, no tuning.
- Baselines have no natural threshold, so they get an oracle one: per unit and attribute, the
  highest threshold that keeps recall ≥ 0.5 (each neuron is scored with both signs). The SAE is
  also scored this way, so the comparison is like for like.

A unit is monosemantic for an attribute when precision ≥ 0.9 at recall ≥ 0.5 (`PRECISION`,
`RECALL`). Score held-out scenes (a world seed the SAE never trained on).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.patch_maps.grid import grid_positions
from hooked_llava.shapes.scene import COLORS, SHAPES, horizontal_word
from hooked_llava.shapes.world import ShapesWorld

PRECISION, RECALL = 0.9, 0.5


def attribute_names() -> list[str]:
    return [
        "object",
        *(f"color={c}" for c in COLORS),
        *(f"shape={s}" for s in SHAPES),
        "side=left",
        "side=middle",
        "side=right",
    ]


def patch_attributes(world: ShapesWorld, scenes: Sequence[Any]) -> Bool[Tensor, "patch attribute"]:
    """Per patch of each scene (row-major, scene after scene), its ground-truth attributes (`attribute_names`)."""
    names = attribute_names()
    out = torch.zeros(len(scenes), world.grid**2, len(names), dtype=torch.bool)
    for i, scene in enumerate(scenes):
        for obj, cells in zip(scene.objects, world.object_patches(scene)):
            side = horizontal_word(obj.center[0], world.image_size)
            for name in ("object", f"color={obj.color}", f"shape={obj.shape}", f"side={side}"):
                out[i, cells, names.index(name)] = True
    return out.reshape(-1, len(names))


@torch.no_grad()
def patch_activations(
    model: Any, hook_name: str, examples: Sequence[Any], batch_size: int = 32
) -> Float[Tensor, "patch d"]:
    """The hook's activation at every image patch of the examples (row-major, example after example)."""
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = model.prepare(images=[e.image for e in chunk], prompts=[e.prompt for e in chunk])
        _, cache = model.run_with_cache(inputs, names_filter=[hook_name])
        acts = cache[hook_name]
        cells = grid_positions(inputs).to(acts.device)
        out.append(acts.gather(1, cells[..., None].expand(-1, -1, acts.shape[-1])).flatten(0, 1))
    return torch.cat(out)


def precision_recall(
    fires: Bool[Tensor, "patch unit"], attrs: Bool[Tensor, "patch attribute"]
) -> tuple[Float[Tensor, "unit attribute"], Float[Tensor, "unit attribute"]]:
    """Precision and recall of each unit's firing against each attribute (0 where undefined)."""
    f, a = fires.float(), attrs.float()
    hits = f.T @ a
    return hits / f.sum(0)[:, None].clamp_min(1), hits / a.sum(0)[None].clamp_min(1)


def oracle_precision(
    values: Float[Tensor, "patch unit"], attrs: Bool[Tensor, "patch attribute"], recall: float = RECALL
) -> tuple[Float[Tensor, "unit attribute"], Float[Tensor, "unit attribute"]]:
    """Per unit and attribute, precision and recall at the highest threshold with recall ≥ `recall`."""
    precision = torch.zeros(values.shape[1], attrs.shape[1])
    achieved = torch.zeros_like(precision)
    for j in range(attrs.shape[1]):
        pos = values[attrs[:, j]]
        if len(pos) == 0:
            continue
        kth = max(int(torch.tensor(recall * len(pos)).ceil()), 1)
        threshold = pos.topk(kth, dim=0).values[-1]  # the kth largest value on the attribute's patches
        fires = values >= threshold
        precision[:, j] = (fires & attrs[:, j : j + 1]).sum(0) / fires.sum(0).clamp_min(1)
        achieved[:, j] = (fires & attrs[:, j : j + 1]).sum(0) / len(pos)
    return precision, achieved


def best_attributes(
    precision: Float[Tensor, "unit attribute"],
    recall: Float[Tensor, "unit attribute"],
    method: str,
    names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Per unit, its best attribute: the most precise one at recall ≥ `RECALL`, else the best F1.

    `names` are the attributes' names (the columns of `precision`), `attribute_names()` by default.
    """
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    score = torch.where(recall >= RECALL, 1 + precision, f1)
    best = score.argmax(1)
    units = torch.arange(len(best))
    p, r = precision[units, best], recall[units, best]
    return pd.DataFrame(
        dict(
            method=method,
            unit=units.tolist(),
            attribute=[(names or attribute_names())[i] for i in best.tolist()],
            precision=p.tolist(),
            recall=r.tolist(),
            monosemantic=((p >= PRECISION) & (r >= RECALL)).tolist(),
        )
    )


def unit_values(
    sae: Any, acts: Float[Tensor, "patch d"], n_random: int | None = None, seed: int = 0
) -> dict[str, Float[Tensor, "patch unit"]]:
    """The units scored: SAE features, neurons (both signs) and random unit directions at the same hook."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(acts.shape[-1], n_random or sae.cfg.d_sae, generator=gen)
    directions = directions / directions.norm(dim=0, keepdim=True)
    centred = acts - acts.mean(0)
    with torch.no_grad():
        features = sae.encode(acts.to(sae.W_enc.device)).cpu().float()
    return {"sae": features, "neurons": torch.cat([centred, -centred], 1), "random": centred @ directions}


def ground_truth_scores(
    sae: Any, acts: Float[Tensor, "patch d"], attrs: Bool[Tensor, "patch attribute"], seed: int = 0
) -> pd.DataFrame:
    """Every unit's best attribute, for the SAE (active > 0, and oracle threshold) and the baselines.

    Dead SAE features (never active on these patches) are left out.
    """
    values = unit_values(sae, acts.float().cpu(), seed=seed)
    alive = (values["sae"] > 0).any(0)
    tables = [best_attributes(*precision_recall(values["sae"] > 0, attrs), "sae")[alive.tolist()]]
    tables.append(best_attributes(*oracle_precision(values["sae"], attrs), "sae (oracle threshold)")[alive.tolist()])
    for method in ("neurons", "random"):
        tables.append(best_attributes(*oracle_precision(values[method], attrs), f"{method} (oracle threshold)"))
    return pd.concat(tables, ignore_index=True)


def summarize(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per method: units, monosemantic units and attributes captured; and per attribute, which methods capture it."""
    mono = scores[scores.monosemantic]
    per_method = scores.groupby("method", sort=False).agg(
        units=("unit", "size"), monosemantic=("monosemantic", "sum"), median_precision=("precision", "median")
    )
    per_method["attributes_captured"] = mono.groupby("method").attribute.nunique().reindex(per_method.index).fillna(0)
    per_method = per_method.astype({"attributes_captured": int}).reset_index()
    counts = mono.groupby(["attribute", "method"]).size().unstack(fill_value=0)
    per_attr = counts.reindex(attribute_names(), fill_value=0).reindex(columns=per_method.method, fill_value=0)
    return per_method, per_attr.rename_axis(columns=None).reset_index()


def feature_families(
    fires: Bool[Tensor, "patch unit"], attrs: Bool[Tensor, "patch attribute"], precision: float = PRECISION
) -> pd.DataFrame:
    """Per attribute, the family of units that detect it precisely (precision ≥ `precision`, any recall),
    and the precision and recall of the family together (a patch counts when any member fires).

    Split features are each narrow (low recall) yet can jointly cover an attribute; this measures that.
    """
    p, _ = precision_recall(fires, attrs)
    rows = []
    for j, name in enumerate(attribute_names()):
        members = (p[:, j] >= precision) & fires.any(0)
        union = fires[:, members].any(1)
        hits = int((union & attrs[:, j]).sum())
        rows.append(
            dict(
                attribute=name,
                features=int(members.sum()),
                family_precision=hits / max(int(union.sum()), 1),
                family_recall=hits / max(int(attrs[:, j].sum()), 1),
            )
        )
    return pd.DataFrame(rows)
