"""The image sections of `hooked-llava explain`: study A's patch map, its attention baseline, and the
top patches in vocabulary space.

The patch map is computed in float64 (readouts included where the analysis takes `dtype=`), and
it is drawn only when the top head's scores for the image patches spread over more than the
readout's noise floor; otherwise the report says so in words.
"""

from __future__ import annotations

import pandas as pd
import torch
from matplotlib.patches import Rectangle
from PIL import Image

from analyses.report.report import NOISE_FLOOR, Report, token_text
from hooked_llava import HookedLlava, LlavaInputs

UNIFORM = "map value (share of the head's patch score)"


def patch_section(model: HookedLlava, inputs: LlavaInputs, report: Report, head: tuple[int, int]) -> None:
    """Study A's map inside the top head (float64) beside the mean-attention baseline."""
    from analyses.attribution.scores import log_prob_increase
    from analyses.patch_maps.grid import grid_positions
    from analyses.patch_maps.maps import patch_importance
    from analyses.plotting.figures import plot_patch_heatmap

    y, readout = report.answer_id, torch.float64  # read out in float64: resolves differences far below 1e-5 nats
    tool = patch_importance(model, inputs, heads=[head], target=y, progress=False, dtype=readout)[0]
    raw = log_prob_increase(model, inputs, unit="position", head=head, target=y, dtype=readout)[0]
    image_scores = raw[grid_positions(inputs)[0].to(raw.device)].double()  # nats, grid order
    spread, floor = float(image_scores.max() - image_scores.min()), NOISE_FLOOR[readout]
    attention = patch_importance(model, inputs, method="attention", progress=False)[0]
    report.maps = {"log_prob_increase": tool.cpu(), "attention": attention.cpu()}
    name, total = f"{head[0]}.{head[1]}", float(raw.double().sum())
    intro = (
        f"Head {name} (layer.head) raises log p(answer) most. Inside it, the image patches' scores sum to "
        f"{float(image_scores.sum()):+.2e} nats (all positions': {total:+.3f}) and span {spread:.2e} nats"
    )
    if spread <= floor:
        report.notes["patches"] = (
            f"{intro}, which is below the {floor:.0e}-nat resolution of a {str(readout)[6:]} readout. The patch "
            "map would only show rounding noise, so it is not drawn; the attention baseline is shown alone."
        )
    else:
        report.notes["patches"] = f"{intro} (the noise floor is {floor:.0e} nats)."
        fig = plot_patch_heatmap(inputs, tool, title=f"patch tool (head {name})", label=UNIFORM)
        _outline(fig.axes[0], inputs)
        report.figures["patches_tool"] = fig
    fig = plot_patch_heatmap(inputs, attention, title="mean attention from the last position", label="attention")
    _outline(fig.axes[0], inputs)
    report.figures["patches_attention"] = fig


def anyres_patch_section(model: HookedLlava, inputs: LlavaInputs, report: Report, image: Image.Image) -> None:
    """The patch section for tiled inputs (LLaVA-NeXT, LLaVA-OneVision): study A's tool and the attention
    baseline per image token, drawn over the image through each token's pixel box (`inputs.image_map()`)."""
    from analyses.patch_maps.anyres import token_importance
    from analyses.plotting.figures import plot_anyres_maps

    tool = token_importance(model, inputs, target=report.answer_id)
    attention = token_importance(model, inputs, method="attention")
    report.notes["patches"] = (
        "Image tokens come from a base view and high-resolution tiles (downsampled where the image is large); "
        "each token's value is drawn over the pixels it covers."
    )
    report.figures["patches_tool"] = plot_anyres_maps(image, inputs, tool)
    report.figures["patches_attention"] = plot_anyres_maps(image, inputs, attention)
    report.notes["embedding"] = (
        "The table of top patches is left out for tiled images (it reads a single patch grid); "
        "the explorers below show the base view."
    )


def _outline(ax, inputs: LlavaInputs) -> None:
    """White boxes around the patches of the objects the question names (the "related" role)."""
    if not inputs.boxes or not inputs.boxes[0] or inputs.crop is None:
        return
    from analyses.patch_maps.grid import grid_positions

    related = inputs.mask("related")[0][grid_positions(inputs)[0]]
    side = inputs.crop[1] / inputs.grid_size
    for cell in related.nonzero()[:, 0].tolist():
        r, c = divmod(cell, inputs.grid_size)
        ax.add_patch(Rectangle((c * side - 0.5, r * side - 0.5), side, side, fill=False, ec="white", lw=0.8))


def embedding_section(model: HookedLlava, inputs: LlavaInputs, report: Report, k: int = 5) -> None:
    """The nearest input-embedding tokens of the patch map's top-k patches."""
    from analyses.lens.embedding import embedding_projection

    if "patches_tool" not in report.figures:
        report.notes["embedding"] = "Left out: the patch map is below its noise floor, so it ranks no patches."
        return
    projection = embedding_projection(model, inputs, k=k)
    heat = report.maps["log_prob_increase"]
    flat = heat.flatten()
    related = _related_cells(inputs)
    rows = []
    for rank, cell in enumerate(flat.topk(min(k, flat.numel())).indices.tolist(), start=1):
        r, c = divmod(cell, heat.shape[-1])
        here = projection[(projection.row == r) & (projection.col == c)].sort_values("rank")
        row = {"patch rank": rank, "row": r, "col": c, "map value": float(flat[cell])}
        if related is not None:
            row["on a named object"] = "yes" if cell in related else "no"
        row["nearest tokens (W_E)"] = ", ".join(token_text(model, t) for t in here.token_id)
        rows.append(row)
    report.tables["embedding"] = pd.DataFrame(rows)


def _related_cells(inputs: LlavaInputs) -> set[int] | None:
    if not inputs.boxes or not inputs.boxes[0]:
        return None
    from analyses.patch_maps.grid import grid_positions

    related = inputs.mask("related")[0][grid_positions(inputs)[0]]
    return set(related.nonzero()[:, 0].tolist())


def object_rank(inputs: LlavaInputs, heat: torch.Tensor) -> int:
    """The best (1-based) rank a patch of the named objects takes in a map."""
    cells = _related_cells(inputs)
    if not cells:
        raise ValueError("these inputs name no objects: prepare them with boxes=[[(x0, y0, x1, y1), ...]].")
    order = heat.flatten().argsort(descending=True).tolist()
    return min(order.index(c) for c in cells) + 1
