"""Figures for the knockout, head-ablation and patching results. These functions only draw.

They build `matplotlib.figure.Figure` objects directly (no pyplot state, any backend) and
return them; save with `fig.savefig(path)`.
"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from jaxtyping import Float
from matplotlib.axes import Axes
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from torch import Tensor


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax  # type: ignore[return-value]
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_knockout(
    summary: pd.DataFrame,
    ax: Axes | None = None,
    title: str | None = None,
    ylabel: str = "change in answer probability (%)",
) -> Figure:
    """Knockout curves: mean change per layer, one line per flow, with its CI band where there is one.

    Args:
        summary: `summarize_knockout` output (flow, layer, mean, ci_low, ci_high); the band is
            drawn only where the interval is finite (not for n = 1).
        ax: draw into these axes instead of a new figure.
        title: the figure title.
        ylabel: what `mean` measures (e.g. "change in log p(answer) (nats)" for `value="delta_log_prob"`).

    Example:
        >>> fig = plot_knockout(summarize_knockout(knockout_sweep(model, inputs)))
        >>> fig.savefig("knockout.png")
    """
    missing = {"flow", "layer", "mean", "ci_low", "ci_high"} - set(summary.columns)
    if missing:
        raise ValueError(f"plot_knockout takes summarize_knockout(df) output; missing columns {sorted(missing)}.")
    fig, ax = _axes(ax, (6.0, 3.5))
    for flow, rows in summary.groupby("flow", sort=False):
        rows = rows.sort_values("layer")
        (line,) = ax.plot(rows["layer"], rows["mean"], marker=".", label=str(flow))
        if rows[["ci_low", "ci_high"]].notna().all(axis=None):
            ax.fill_between(rows["layer"], rows["ci_low"], rows["ci_high"], color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xlabel="layer (centre of the knocked-out window)", ylabel=ylabel, title=title)
    ax.legend(fontsize="small")
    return fig


def _heatmap(
    values: Tensor,
    ax: Axes | None,
    title: str | None,
    xlabel: str,
    ylabel: str,
    size: tuple[float, float],
    label: str | None = None,
) -> tuple[Figure, Axes]:
    data = values.detach().float().cpu().numpy()
    fig, ax = _axes(ax, size)
    finite = data[~(data != data)]  # NaN marks pieces that were not swept
    bound = float(abs(finite).max()) if finite.size and abs(finite).max() > 0 else 1.0
    image = ax.imshow(data, cmap="RdBu", norm=TwoSlopeNorm(0.0, -bound, bound), aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    return fig, ax


def plot_head_scan(
    scores: Float[Tensor, "n_layers n_heads"],
    ax: Axes | None = None,
    title: str | None = None,
    baseline: float | None = None,
) -> Figure:
    """Head-ablation heatmap, layers down and heads across, centred on `baseline` (e.g. the unablated metric).

    Example:
        >>> fig = plot_head_scan(head_ablation_scan(model, inputs, metric), baseline=float(metric(model(inputs))))
    """
    values = scores if baseline is None else scores - baseline
    label = "metric" if baseline is None else "metric - baseline"
    fig, _ = _heatmap(values, ax, title or f"head ablation ({label})", "head", "layer", (5.0, 4.0), label=label)
    return fig


def plot_patching(
    result: Float[Tensor, "n_layers n_index"],
    labels: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str = "position",
    baseline: float | None = None,
) -> Figure:
    """Patching heatmap: layers down, positions / heads / groups across (NaN cells stay blank).

    Args:
        result: a patching or attribution result `[n_layers, n_index]`.
        labels: tick labels for the index axis (e.g. the `label` column of `to_frame`).
        baseline: subtracted before drawing (e.g. the corrupted metric for activation patching).

    Example:
        >>> fig = plot_patching(patch_residual(model, corrupted, clean, metric), baseline=corrupted_metric)
    """
    values = result if baseline is None else result - baseline
    fig, ax = _heatmap(values, ax, title, xlabel, "layer", (max(5.0, 0.18 * values.shape[1]), 4.0))
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels=list(labels), rotation=90, fontsize="x-small")
    return fig


def plot_patch_grid(values: Float[Tensor, " n_blocks"], ax: Axes | None = None, title: str | None = None) -> Figure:
    """One layer of an image-block result drawn on the image's block grid (row-major blocks).

    Example:
        >>> fig = plot_patch_grid(patch_image_blocks(model, corrupted, clean, metric)[layer] - corrupted_metric)
    """
    side = int(round(values.numel() ** 0.5))
    if side * side != values.numel():
        raise ValueError(f"{values.numel()} blocks do not form a square grid.")
    fig, ax = _heatmap(values.reshape(side, side), ax, title, "block column", "block row", (4.0, 3.5))
    ax.set_xticks(range(side)), ax.set_yticks(range(side))
    return fig


__all__ = ["plot_head_scan", "plot_knockout", "plot_patch_grid", "plot_patching"]


def plot_sweep(knockout: pd.DataFrame, title: str | None = None, columns: int = 3) -> Figure:
    """The study's figure for a dataset sweep: one panel per category, mean relative change (%) per
    layer, one line per flow, with its 95% interval where a category has at least 5 examples
    (`summarize_knockout`: the band stays within −100 % and what the probabilities allow; below 5
    examples the panel title says "no interval").

    Args:
        knockout: `run_sweep(...)["knockout"]` (needs a `category` column and `rel_change_pct`, or
            `rel_change` as `knockout_sweep` names it).
        title: the figure title.
        columns: panels per row.

    Example:
        >>> runs = knockout_sweep(model, inputs, ["image->last", "question->last"]).assign(category="demo")
        >>> plot_sweep(runs).savefig("sweep.png")  # usually run_sweep(...)["knockout"]
    """
    from analyses.information_flow.stats import MIN_N, summarize_knockout

    if not len(knockout):
        raise ValueError("nothing to plot: the sweep kept no correctly answered examples.")
    value = "rel_change_pct" if "rel_change_pct" in knockout else "rel_change"
    categories = list(dict.fromkeys(knockout["category"]))
    rows = -(-len(categories) // columns)
    fig = Figure(figsize=(4.2 * min(columns, len(categories)), 3.0 * rows), layout="constrained")
    for k, category in enumerate(categories):
        ax = fig.add_subplot(rows, min(columns, len(categories)), k + 1)
        summary = summarize_knockout(knockout[knockout["category"] == category], value)
        n = int(summary["n"].max()) if len(summary) else 0
        plot_knockout(summary, ax=ax, title=f"{category} (n={n}{'' if n >= MIN_N else ', no interval'})")
        if k:
            ax.get_legend().remove()
    if title:
        fig.suptitle(title)
    return fig
