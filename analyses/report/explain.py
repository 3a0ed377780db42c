"""`hooked-llava explain`: one question about one image, explained in a self-contained HTML report.

`explain` computes; `analyses.report.html.write_html` writes the page. The report shows the
answer and its strongest competitors, where the answer forms across layers (logit lens), which
heads write it (log-probability increase), which image patches it comes from (study A's patch
tool, computed in float64, beside its attention baseline), which information flows it needs
(study B's knockout, in nats and in the study's relative change), and what the top image
patches mean in vocabulary space. Text-only models get every section that needs no image.
Tokens are tracked by id and shown with the tokenizer's own decoding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from analyses.report.html import write_html as _write_html  # noqa: E402
from analyses.report.patches import anyres_patch_section, embedding_section, patch_section  # noqa: E402
from analyses.report.report import (  # noqa: E402, F401 (FLOWS, NOISE_FLOOR, Report: the report's names, here too)
    FLOWS,
    NOISE_FLOOR,
    SECTIONS,
    TEXT_FLOWS,
    TEXT_SECTIONS,
    Report,
    token_text,
)
from hooked_llava import HookedLlava, LlavaInputs  # noqa: E402


def _timed(report: Report, name: str, say: Callable[[str], None], fn: Callable[[], Any]) -> Any:
    say(f"[{len(report.timings) + 1}/{len(report.sections)}] {name} ...")
    start = time.perf_counter()
    out = fn()
    report.timings[name] = time.perf_counter() - start
    return out


def explain(
    model: HookedLlava,
    inputs: LlavaInputs,
    say: Callable[[str], None] = print,
    flows: list[str] | None = None,
    model_name: str | None = None,
) -> Report:
    """Run every analysis of the report on a one-example batch.

    Args:
        model: the model (a LLaVA, or a text-only model: the image sections are left out).
        inputs: one prepared example; `boxes` (the objects the question names) are optional.
        say: progress messages.
        flows: knockout flows (default: the study's four main ones, or the text ones).
        model_name: shown in the report (default: the model's architecture).

    Example:
        >>> report = explain(model, model.prepare(images=[image], questions=["What is the color of the circle?"]))
        >>> write_html(report, "report/")
    """
    if len(inputs) != 1:
        raise ValueError(f"explain takes one example; got a batch of {len(inputs)} (use inputs[[i]]).")
    has_image = inputs.pixel_values is not None
    start = time.perf_counter()
    report = _answer(model, inputs, model_name or model.cfg.original_architecture)
    report.sections = SECTIONS if has_image else TEXT_SECTIONS
    report.timings["answer"] = time.perf_counter() - start
    say(f"[1/{len(report.sections)}] answer: {report.answer!r} (p = {report.probability:.3f})")
    _timed(report, "logit lens", say, lambda: _logit_lens(model, inputs, report))
    top_head = _timed(report, "head attribution", say, lambda: _heads(model, inputs, report))
    tiled = inputs.token_tables is not None  # LLaVA-NeXT / OneVision: base view and tiles
    if has_image:
        report.image = _picture(inputs)
        if tiled:
            image = _original(report.image, inputs.image_sizes[0])
            _timed(report, "patch importance", say, lambda: anyres_patch_section(model, inputs, report, image))
        else:
            _timed(report, "patch importance", say, lambda: patch_section(model, inputs, report, top_head))
    default = FLOWS if has_image else TEXT_FLOWS
    _timed(report, "attention knockout", say, lambda: _knockout(model, inputs, report, flows or default))
    if has_image and not tiled:
        _timed(report, "embedding projection", say, lambda: embedding_section(model, inputs, report))
        start = time.perf_counter()
        _explorers(model, inputs, report)
        report.timings["interactive explorers"] = time.perf_counter() - start
    return report


def _explorers(model: HookedLlava, inputs: LlavaInputs, report: Report) -> None:
    """The interactive views shown beside the static figures: attention by the patches, the lens on the patches."""
    from analyses.viz import attention_explorer, patch_lens_explorer

    if inputs.token_tables is not None:  # tiled inputs (NeXT, OneVision): the explorers draw one patch grid
        note = "The interactive explorers need one patch grid (not the tiles of LLaVA-NeXT or OneVision)."
        report.notes.setdefault("embedding", note)
        return
    report.explorers["patches"] = attention_explorer(model, inputs)
    report.explorers["embedding"] = patch_lens_explorer(model, inputs)


def _picture(inputs: LlavaInputs) -> np.ndarray:
    from analyses.plotting.figures import processed_image

    if inputs.token_tables is not None and inputs.pixel_values is not None:  # tiled: the base view
        return processed_image(inputs.pixel_values[0, 0])
    return processed_image(inputs)


def _original(picture: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The base view stretched back to the image's original `(height, width)`: the canvas token boxes refer to."""
    pixels = (np.clip(picture, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels).resize((size[1], size[0]))


def _answer(model: HookedLlava, inputs: LlavaInputs, name: str) -> Report:
    with torch.no_grad():
        probs = model(inputs)[0, inputs.last[0]].double().softmax(-1)
    answer_id = int(probs.argmax())
    ids = inputs.input_ids[0][inputs.attention_mask[0].bool()]
    question_ids = inputs.input_ids[0][inputs.mask("question")[0]]
    prompt = inputs.texts[0] if inputs.texts else model.tokenizer.decode(ids)
    question = model.tokenizer.decode(question_ids).strip() if len(question_ids) else prompt
    report = Report(name, prompt, question, token_text(model, answer_id), answer_id, float(probs[answer_id]))
    top = probs.topk(min(5, probs.numel()))
    report.tables["answer"] = pd.DataFrame(
        {
            "rank": range(1, len(top.indices) + 1),
            "token": [token_text(model, int(t)) for t in top.indices],
            "token id": top.indices.tolist(),
            "probability": top.values.tolist(),
        }
    )
    return report


def _logit_lens(model: HookedLlava, inputs: LlavaInputs, report: Report) -> None:
    """Rank and probability, after every layer, of the answer and its three strongest competitors."""
    from analyses.lens.logit import logit_lens
    from analyses.plotting.figures import plot_logit_lens

    lens = logit_lens(model, inputs)[:, 0, 0].double()  # [layer, d_vocab]
    final = lens[-1].clone()
    final[report.answer_id] = -torch.inf
    tracked = [report.answer_id, *final.topk(3).indices.tolist()]
    probs, last = lens.softmax(-1), int(inputs.last[0])
    rows = []
    for layer in range(lens.shape[0]):
        for token in tracked:
            rank = int((lens[layer] > lens[layer, token]).sum()) + 1
            label = token_text(model, token) + (" (answer)" if token == report.answer_id else "")
            rows.append((layer, 0, last, label, token, rank, float(probs[layer, token])))
    table = pd.DataFrame(rows, columns=["layer", "batch", "position", "form", "token_id", "rank", "prob"])
    report.tables["logit_lens"] = table.drop(columns="batch").rename(columns={"form": "token"})
    where = f"the last position ({last}, where the answer is predicted)"
    report.figures["logit_lens_prob"] = plot_logit_lens(table, value="prob", title=f"logit lens at {where}")
    report.figures["logit_lens_rank"] = plot_logit_lens(table, value="rank", title=f"answer rank at {where}")
    answer = table[table.token_id == report.answer_id]
    first = int(answer[answer["rank"] == 1].layer.min()) if (answer["rank"] == 1).any() else None
    n = model.cfg.n_layers
    report.notes["logit-lens"] = (
        f"The answer {report.answer} is the top token from readout {first} on (of 0–{n}; readout {n} is the output)."
        if first is not None
        else f"The answer {report.answer} never ranks first in the lens (readouts 0–{n})."
    )


def _heads(model: HookedLlava, inputs: LlavaInputs, report: Report) -> tuple[int, int]:
    from analyses.attribution.scores import log_prob_increase, top_heads
    from analyses.plotting.figures import plot_head_scores

    scores = log_prob_increase(model, inputs, unit="head", target=report.answer_id)
    table = top_heads(scores, k=10).drop(columns=["batch", "name"])
    report.tables["top_heads"] = table.rename(columns={"score": "log-prob increase (nats)"})
    report.figures["head_scores"] = plot_head_scores(scores, title="log-probability increase of each head")
    return int(table["layer"].iloc[0]), int(table["head"].iloc[0])


def _knockout(model: HookedLlava, inputs: LlavaInputs, report: Report, flows: list[str]) -> None:
    from analyses.information_flow.attention_knockout import knockout_sweep
    from analyses.information_flow.stats import summarize_knockout
    from analyses.plotting.flows import plot_knockout

    sweep = knockout_sweep(model, inputs, flows, answer=report.answer_id, progress=False)
    if "delta_log_prob" not in sweep:
        sweep["delta_log_prob"] = np.log(sweep.p_blocked.astype(float)) - np.log(sweep.p_base.astype(float))
    report.tables["knockout_sweep"] = sweep
    strongest = sweep.loc[sweep.delta_log_prob.abs().groupby(sweep.flow, sort=False).idxmax()]
    report.tables["knockout"] = pd.DataFrame(
        {
            "flow": strongest.flow,
            "strongest layer": strongest.layer,
            "Δ log p(answer) (nats)": strongest.delta_log_prob,
            "relative change (%)": strongest.rel_change,
            "p(answer) after knockout": strongest.p_blocked,
        }
    )
    fig = Figure(figsize=(10.0, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    plot_knockout(summarize_knockout(sweep, "delta_log_prob"), ax=left, ylabel="change in log p(answer) (nats)")
    plot_knockout(summarize_knockout(sweep), ax=right, ylabel="relative change in p(answer) (%)")
    right.get_legend().remove()
    fig.suptitle("attention knockout: blocking each flow in a window of layers")
    report.figures["knockout"] = fig
    best = strongest.iloc[int(strongest.delta_log_prob.abs().argmax())]
    report.notes["knockout"] = (
        f"The largest effect: blocking {best.flow} around layer {int(best.layer)} changes log p(answer) by "
        f"{best.delta_log_prob:+.3f} nats (p {best.p_base:.3f} → {best.p_blocked:.3f}, {best.rel_change:+.1f} %)."
    )


def write_html(report: Report, out_dir: Any) -> Any:
    """Write `report.html`, one PNG per figure and the tables as CSV (see `analyses.report.html`).

    Example:
        >>> path = write_html(explain(model, inputs[[0]], say=lambda msg: None), "report")
    """
    return _write_html(report, out_dir)
