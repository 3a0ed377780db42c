"""`hooked-llava explain`: one question about one image, explained in a self-contained HTML report.

The report shows the answer and its probability, where the answer forms across layers (logit
lens), which heads write it (log-probability increase), which image patches it comes from
(study A's patch tool beside its attention baseline), which information flows it needs
(study B's knockout curves), and what the top image patches mean in vocabulary space.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from hooked_llava import HookedLlava, LlavaInputs  # noqa: E402

FLOWS = ["question->last", "image->last", "image->question", "last->last"]
SECTIONS = ("answer", "logit-lens", "heads", "patches", "knockout", "embedding")


@dataclass
class Report:
    """Everything `explain` computed: figures (by file stem), tables and the headline numbers.

    Example:
        >>> report = explain(model, model.prepare(images=[image], questions=["What is the color of the circle?"]))
        >>> report.answer, report.probability, sorted(report.figures)
    """

    question: str
    answer: str
    probability: float
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def _step(report: Report, name: str, say: Callable[[str], None]) -> Callable[[Callable[[], Any]], Any]:
    def run(fn: Callable[[], Any]) -> Any:
        say(f"[{len(report.timings) + 1}/{len(SECTIONS)}] {name} ...")
        start = time.perf_counter()
        out = fn()
        report.timings[name] = time.perf_counter() - start
        return out

    return run


def explain(
    model: HookedLlava, inputs: LlavaInputs, say: Callable[[str], None] = print, flows: list[str] | None = None
) -> Report:
    """Run every analysis of the report on a single-example batch.

    Example:
        >>> report = explain(model, model.prepare(images=[image], questions=["What is the color of the circle?"]))
        >>> write_html(report, "report/")
    """
    from . import plot_flows, plotting
    from .attribution import log_prob_increase, top_heads
    from .embedding import embedding_projection
    from .knockout import knockout_sweep, summarize_knockout
    from .logit_lens import logit_lens, token_ranks
    from .patch_importance import patch_importance

    with torch.no_grad():
        probs = model(inputs)[0, inputs.last[0]].float().softmax(-1)
    answer_id = int(probs.argmax())
    answer = model.to_string([answer_id]).strip()
    question = " ".join(model.to_str_tokens(inputs.input_ids[0][inputs.mask("question")[0]]))
    report = Report(question=question, answer=answer, probability=float(probs[answer_id]))
    say(f"[1/{len(SECTIONS)}] answer: {answer!r} (p = {report.probability:.3f})")
    report.timings["answer"] = 0.0
    lens = _step(report, "logit lens", say)(lambda: token_ranks(model, logit_lens(model, inputs), [answer]))
    report.tables["logit_lens"] = lens
    report.figures["logit_lens_prob"] = plotting.plot_logit_lens(lens, value="prob")
    report.figures["logit_lens_rank"] = plotting.plot_logit_lens(lens, value="rank")
    heads = _step(report, "head attribution", say)(lambda: log_prob_increase(model, inputs, unit="head"))
    report.tables["top_heads"] = top_heads(heads, k=10)
    report.figures["head_scores"] = plotting.plot_head_scores(heads)
    maps = _step(report, "patch importance", say)(
        lambda: {
            m: patch_importance(model, inputs, method=m, progress=False) for m in ("log_prob_increase", "attention")
        }
    )
    report.figures["patches_tool"] = plotting.plot_patch_heatmap(inputs, maps["log_prob_increase"], title="patch tool")
    report.figures["patches_attention"] = plotting.plot_patch_heatmap(inputs, maps["attention"], title="attention")
    sweep = _step(report, "attention knockout", say)(
        lambda: knockout_sweep(model, inputs, flows or FLOWS, answer=answer_id, progress=False)
    )
    report.tables["knockout"] = summarize_knockout(sweep)
    report.figures["knockout"] = plot_flows.plot_knockout(report.tables["knockout"], title="attention knockout")
    projection = _step(report, "embedding projection", say)(lambda: embedding_projection(model, inputs, k=5))
    report.tables["embedding"] = _top_patch_tokens(projection, maps["log_prob_increase"][0], k=5)
    return report


def _top_patch_tokens(projection: pd.DataFrame, heat: torch.Tensor, k: int) -> pd.DataFrame:
    """The vocabulary-space tokens of the `k` most important image patches, one row per patch."""
    flat = heat.flatten()
    top = flat.topk(min(k, flat.numel())).indices.tolist()
    width = heat.shape[-1]
    rows = []
    for rank, cell in enumerate(top, start=1):
        r, c = divmod(cell, width)
        here = projection[(projection.row == r) & (projection.col == c)].sort_values("rank")
        rows.append(
            {
                "patch rank": rank,
                "row": r,
                "col": c,
                "importance": round(float(flat[cell]), 4),
                "top tokens (W_E)": ", ".join(here.token.astype(str).tolist()),
            }
        )
    return pd.DataFrame(rows)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _img(name: str, data: bytes) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<figure id="fig-{name}"><img alt="{name}" src="data:image/png;base64,{encoded}"></figure>'


def write_html(report: Report, out_dir: str | Path) -> Path:
    """Write `report.html` (figures embedded) and one PNG per figure into `out_dir`.

    Example:
        >>> path = write_html(explain(model, inputs[0], say=lambda msg: None), "report")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: _png(fig) for name, fig in report.figures.items()}
    for name, data in pngs.items():
        (out / f"{name}.png").write_bytes(data)
    table = lambda key: report.tables[key].to_html(index=False, float_format=lambda v: f"{v:.4g}")  # noqa: E731
    lens = report.tables["logit_lens"]
    body = [
        f'<section id="answer"><h2>Answer</h2><p class="question">Q: {html.escape(report.question)}</p>'
        f'<p class="answer">A: <b>{html.escape(report.answer)}</b> with probability '
        f"{report.probability:.3f}</p></section>",
        '<section id="logit-lens"><h2>Where the answer forms (logit lens, last position)</h2>'
        + _img("logit_lens_prob", pngs["logit_lens_prob"])
        + _img("logit_lens_rank", pngs["logit_lens_rank"])
        + f"<p>{len(lens)} readouts tracked.</p></section>",
        '<section id="heads"><h2>Which heads write it (log-probability increase)</h2>'
        + _img("head_scores", pngs["head_scores"])
        + table("top_heads")
        + "</section>",
        '<section id="patches"><h2>Which image patches it comes from</h2>'
        + _img("patches_tool", pngs["patches_tool"])
        + _img("patches_attention", pngs["patches_attention"])
        + "<p>Left: study A's patch tool (top head's per-position scores). Right: mean attention baseline.</p>"
        "</section>",
        '<section id="knockout"><h2>Which information flows it needs (attention knockout)</h2>'
        + _img("knockout", pngs["knockout"])
        + table("knockout")
        + "</section>",
        '<section id="embedding"><h2>Top image patches in vocabulary space</h2>' + table("embedding") + "</section>",
    ]
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in report.timings.items() if v)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>hooked-llava explain</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "figure{display:inline-block;margin:.5em}img{max-width:520px}"
        "table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "</style></head><body><h1>hooked-llava explain</h1>"
        + "".join(body)
        + f"<footer><p>Computed in: {html.escape(timing)}</p></footer></body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
