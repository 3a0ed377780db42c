"""The HTML page of `hooked-llava explain`: one self-contained file, figures embedded as PNG, and the
interactive explorers of `analyses.viz` beside them (their scripts inlined once, no network).

Each figure carries a sentence saying how to read it; tables hold no NaN (missing values are
left out, and confidence columns are not shown for a single example).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image

from analyses.report.report import Report
from analyses.viz import page_assets

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em;color:#222}"
    "header{display:flex;gap:1.5em;align-items:center}header img{width:224px;image-rendering:pixelated}"
    "figure{display:inline-block;margin:.5em;vertical-align:top;max-width:520px}figure img{max-width:520px}"
    "figure.wide{max-width:1050px}figure.wide img{max-width:1050px}figcaption{font-size:.85em;color:#444}"
    "table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px}"
    "p.note{background:#f4f4f8;padding:.4em .6em}"
)
CAPTIONS = {
    "logit_lens_prob": "Each line is a token's probability when the residual stream before each layer (and, last, "
    "after the final layer) is read through the final norm and the unembedding, at the position that predicts "
    "the answer. The answer is tracked by token id beside its three strongest competitors at the output.",
    "logit_lens_rank": "The same readouts as ranks among all tokens (1 = top, log scale).",
    "head_scores": "Each cell is one head's log-probability increase: how much adding the head's output at the "
    "last position to the residual stream entering its layer raises log p(answer), in nats, with the final "
    "norm's scale frozen (study A). Red raises the answer, blue lowers it.",
    "patches_tool": "Study A's patch tool: inside the top head, each image patch's share of the head's output is "
    "scored by the log-probability increase it brings (float64), min-max normalised and divided by the sum. "
    "Brighter patches raise the answer more. White squares: patches of the objects the question names.",
    "patches_attention": "The baseline: attention from the last position to each image patch, averaged over all "
    "heads and layers. White squares: patches of the objects the question names.",
    "knockout": "Each point blocks one flow (attention from the source positions to the target positions) in a "
    "window of up to 9 layers centred on that layer. Left: change in the answer's log-probability (nats), which "
    "resolves effects on confident answers; right: study B's relative change in its probability (%). One example, "
    "so there is no confidence band.",
}
HEADINGS = {
    "logit-lens": "Where the answer forms (logit lens)",
    "heads": "Which heads write it (log-probability increase)",
    "patches": "Which image patches it comes from",
    "knockout": "Which information flows it needs (attention knockout)",
    "embedding": "Top image patches in vocabulary space",
}
EXPLORER_CAPTIONS = {
    "patches": "Interactive: click a token to see its attention over the image patches and the text at any layer "
    "and head (or their mean); click a patch to see which tokens attend to it; hover for the exact value.",
    "embedding": "Interactive: every image patch read through the logit lens, its top token written on it, at the "
    "readout you choose; hover for its top five with probabilities.",
}
TABLE_CAPTIONS = {
    "top_heads": "The ten heads with the largest log-probability increase (rank 1 = largest).",
    "knockout": "Per flow, the layer where blocking it moves log p(answer) most.",
    "embedding": "The patch map's top patches and the input-embedding tokens nearest their projector outputs.",
}


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _figure(name: str, data: bytes) -> str:
    wide = ' class="wide"' if name == "knockout" else ""
    caption = html.escape(CAPTIONS.get(name, ""))
    image = f'<img alt="{name}" src="{_data_uri(data)}">'
    return f'<figure id="fig-{name}"{wide}>{image}<figcaption>{caption}</figcaption></figure>'


def _table(frame: pd.DataFrame) -> str:
    frame = frame.loc[:, [c for c in frame.columns if frame[c].notna().all()]]
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0)


def _header(report: Report, image: bytes | None) -> str:
    picture = f'<img id="input-image" alt="input image" src="{_data_uri(image)}">' if image else ""
    others = report.tables["answer"].iloc[1:4]
    competitors = ", ".join(f"{t} ({p:.3f})" for t, p in zip(others.token, others.probability, strict=True))
    return (
        f'<header>{picture}<div><p class="model">Model: <b>{html.escape(report.model)}</b></p>'
        f'<p class="question">Question: {html.escape(report.question)}</p>'
        f'<p class="answer">Answer: <b>{html.escape(report.answer)}</b> with probability {report.probability:.3f}'
        f" (token id {report.answer_id})</p><p>Strongest competitors: {html.escape(competitors)}</p></div></header>"
    )


def _section(report: Report, key: str, pngs: dict[str, bytes]) -> str:
    names = {"logit-lens": ["logit_lens_prob", "logit_lens_rank"], "heads": ["head_scores"]}
    names |= {"patches": ["patches_tool", "patches_attention"], "knockout": ["knockout"]}
    parts = [f'<section id="{key}"><h2>{HEADINGS[key]}</h2>']
    if key in report.notes:
        parts.append(f'<p class="note">{html.escape(report.notes[key])}</p>')
    parts += [_figure(name, pngs[name]) for name in names.get(key, []) if name in pngs]
    table = {"heads": "top_heads", "knockout": "knockout", "embedding": "embedding"}.get(key)
    if table in report.tables:
        parts.append(f"<p>{TABLE_CAPTIONS[table]}</p>" + _table(report.tables[table]))
    if key in report.explorers:
        caption = html.escape(EXPLORER_CAPTIONS[key])
        view = report.explorers[key].fragment(assets=False)  # the scripts come once, at the end of the page
        parts.append(f'<div class="explorer" id="explorer-{key}"><p>{caption}</p>{view}</div>')
    return "".join(parts) + "</section>"


def _timings(report: Report) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.2f} s</td></tr>" for k, v in report.timings.items())
    total = sum(report.timings.values())
    return (
        f"<footer><h3>Time per section</h3><table>{rows}<tr><th>total</th><th>{total:.2f} s</th></tr></table></footer>"
    )


def write_html(report: Report, out_dir: str | Path) -> Path:
    """Write `report.html` (figures embedded), one PNG per figure and the tables as CSV into `out_dir`.

    Example:
        >>> path = write_html(explain(model, inputs, say=lambda msg: None), "report")
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = {name: _png(fig) for name, fig in report.figures.items()}
    for name, data in pngs.items():
        (out / f"{name}.png").write_bytes(data)
    for name, table in report.tables.items():
        table.to_csv(out / f"{name}.csv", index=False)
    image = None
    if report.image is not None:
        buffer = io.BytesIO()
        Image.fromarray((np.clip(report.image, 0, 1) * 255).astype(np.uint8)).save(buffer, format="PNG")
        image = buffer.getvalue()
    answer = (
        '<section id="answer"><h2>Answer</h2>'
        + f"<p>Prompt: <code>{html.escape(report.prompt)}</code></p>"
        + "<p>The model's five most probable next tokens:</p>"
        + _table(report.tables["answer"])
        + "</section>"
    )
    body = [_header(report, image), answer, *(_section(report, key, pngs) for key in report.sections[1:])]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>hooked-llava explain: {html.escape(report.model)}"
        f"</title><style>{STYLE}</style></head><body><h1>Why does the model answer {html.escape(report.answer)}?</h1>"
        + "".join(body)
        + _timings(report)
        + (page_assets() if report.explorers else "")
        + "</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path
