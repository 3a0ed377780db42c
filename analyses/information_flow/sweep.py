"""Dataset-scale knockout sweeps (study B), resumable, over the Shapes world or a GQA task CSV.

Each example is written to its own file as soon as it is finished (atomically), so a sweep
that is killed and restarted skips what is done and ends with the same table. A resume only
reuses results computed with the same settings and example content (see `analyses.information_flow.keys`).
Like the study, only examples the model answers correctly are swept. Relative changes are in
percent everywhere (`rel_change_pct`), log-probability changes in nats (`delta_log_prob`).
The examples themselves (`SweepExample`, `shapes_examples`, `answer_token`, ...) are defined in
`analyses.information_flow.examples` and importable from here.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from analyses.information_flow.examples import (
    LLAVA15_TEMPLATE,
    STUDY_B_TEMPLATE,
    BadExampleError,
    SweepExample,
    _check_ids,
    _guarded,
    answer_token,
    iter_rows,
    shapes_examples,
)
from analyses.information_flow.keys import FORMAT, METRIC, claim_folder, example_key, model_fingerprint
from hooked_llava import HookedLlava

__all__ = [
    "DEFAULT_FLOWS", "ERROR_COLUMNS", "LLAVA15_TEMPLATE", "STUDY_B_TEMPLATE", "TABLES", "BadExampleError",
    "SweepExample", "answer_token", "collect", "iter_rows", "run_sweep", "shapes_examples", "summary_table",
    "sweep_settings", "write_tables",
]  # fmt: skip

DEFAULT_FLOWS = ["question->last", "image->last", "image->question", "last->last"]
TABLES = ("examples", "knockout", "lens")
ERROR_COLUMNS = ["id", "origin", "error"]


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _one(model: HookedLlava, ex: SweepExample, image: Any, target: int, flows: list[str], window: int,
         lens: bool) -> dict[str, pd.DataFrame]:  # fmt: skip
    from analyses.information_flow.attention_knockout import knockout_sweep
    from analyses.lens.logit import logit_lens, token_ranks

    inputs = model.prepare(images=[image], prompts=[ex.prompt], boxes=[ex.boxes])
    with torch.no_grad():
        predicted = int(model(inputs)[0, inputs.last[0]].argmax())
    meta = {
        "id": ex.id,
        "category": ex.category,
        "answer": ex.answer,
        "predicted": model.to_string([predicted]).strip(),
    }
    out = {"examples": pd.DataFrame([{**meta, "correct": predicted == target}])}
    if predicted != target:
        return out
    runs = knockout_sweep(model, inputs, flows, window=window, answer=target, progress=False)
    runs = runs.drop(columns="example").rename(columns={"rel_change": "rel_change_pct"})
    out["knockout"] = runs.assign(id=ex.id, category=ex.category)
    if lens:
        ranks = token_ranks(model, logit_lens(model, inputs), [ex.answer])
        out["lens"] = ranks.assign(id=ex.id, category=ex.category)
    return out


def _is_done(done_dir: Path, ex: SweepExample) -> bool:
    """Finished with the same content; a finished example whose content changed is recomputed."""
    if not (done_dir / f"{ex.id}.examples.csv").exists():
        return False
    key_path = done_dir / f"{ex.id}.key.json"
    old = json.loads(key_path.read_text()) if key_path.exists() else None
    same = old == json.loads(json.dumps(_guarded("key", ex, lambda: example_key(ex))))
    if not same:
        warnings.warn(f"example {ex.id} changed since it was swept: recomputing it.", stacklevel=3)
    return same


def _compute(model: HookedLlava, ex: SweepExample, flows: list[str], window: int,
             lens: bool) -> dict[str, pd.DataFrame]:  # fmt: skip
    """One example's tables (what a Ray worker returns); a bad image or answer is a `BadExampleError`."""
    image = _guarded("pixels", ex, ex.load_image)
    try:
        target = answer_token(model, ex.answer)
    except ValueError as err:
        raise BadExampleError(f"{ex.origin or ex.id}: {err}") from err
    return _one(model, ex, image, target, flows, window, lens)


def _store(done_dir: Path, ex_id: str, key: dict[str, Any], results: Mapping[str, pd.DataFrame]) -> None:
    """Write one example's files, each atomically; "examples" is written last: it marks the example done."""
    for name in TABLES:  # stale files of a changed example go first
        (done_dir / f"{ex_id}.{name}.csv").unlink(missing_ok=True)
    tmp = done_dir / f"{ex_id}.key.tmp"
    tmp.write_text(json.dumps(key))
    os.replace(tmp, done_dir / f"{ex_id}.key.json")
    for name in ("knockout", "lens", "examples"):
        if name in results:
            _write_atomic(results[name], done_dir / f"{ex_id}.{name}.csv")


def _sweep_one(model: HookedLlava, ex: SweepExample, done_dir: Path, flows: list[str], window: int,
               lens: bool) -> None:  # fmt: skip
    key = _guarded("key", ex, lambda: example_key(ex))
    _store(done_dir, ex.id, key, _compute(model, ex, flows, window, lens))


def sweep_settings(model: HookedLlava, flows: list[str], window: int, lens: bool,
                   data: Mapping[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Everything besides the examples themselves that determines a sweep's results.

    Example:
        >>> sweep_settings(model, DEFAULT_FLOWS, 9, False, {"shapes_seed": 777})["window"]
        9
    """
    return {"model": model_fingerprint(model), "flows": list(flows), "window": int(window), "lens": bool(lens),
            "metric": METRIC, "format": FORMAT, **dict(data or {})}  # fmt: skip


def run_sweep(
    model: HookedLlava,
    examples: Iterable[SweepExample],
    out_dir: str | Path,
    flows: list[str] | None = None,
    window: int = 9,
    lens: bool = False,
    progress: bool = True,
    on_example: Callable[[SweepExample], None] | None = None,
    data: Mapping[str, Any] | None = None,
    force: bool = False,
    bad_rows: list[dict[str, str]] | None = None,
) -> dict[str, pd.DataFrame]:
    """Sweep knockout flows (and optionally the logit lens) over examples, resuming past work.

    A folder holds one set of settings (`sweep_settings`: model fingerprint, flows, window, lens,
    metric, and `data`). Rerunning with other settings raises `SettingsChangedError` naming what
    changed, unless `force` (then the old results are deleted). A finished example whose content
    (prompt, answer, category, boxes, image bytes) changed is recomputed.

    Args:
        model: the model.
        examples: `SweepExample`s with unique ids (e.g. `shapes_examples(50)` or `gqa_examples(csv, images)`).
        out_dir: where per-example results and `settings.json` go; results of the same settings are reused.
        flows: knockout flows (default: question→last, image→last, image→question, last→last).
        window: knockout window (study B: 9).
        lens: also record the answer's logit-lens rank and probability at the last position.
        on_example: called after each newly finished example (progress hooks, tests).
        data: settings that describe where the examples come from (the CLI gives the Shapes seed).
        force: delete results of other settings instead of refusing.
        bad_rows: None: an example that cannot be swept raises `BadExampleError` (finished ones
            stay on disk; `collect` gathers them). A list: such examples are skipped and appended
            to it as {"id", "origin", "error"}.

    Returns:
        Tables "examples" (id, category, answer, predicted, correct), "knockout" (the
        `knockout_sweep` columns with `rel_change` as `rel_change_pct`, plus id and category; correct
        examples only) and "lens", of the examples given, in their order.

    Example:
        >>> tables = run_sweep(model, shapes_examples(1, categories=["Colour"]), "runs/shapes")  # resumes on rerun
        >>> tables["examples"].groupby("category")["correct"].mean()  # then summary_table(tables["knockout"])
    """
    from analyses.information_flow.flows import resolve_flows

    examples, flows = list(examples), list(flows or DEFAULT_FLOWS)
    resolve_flows(flows)  # an unknown flow name fails here, before the folder records it
    _check_ids(examples)
    claim_folder(out_dir, sweep_settings(model, flows, window, lens, data), force)
    done_dir = Path(out_dir) / "examples"
    done_dir.mkdir(parents=True, exist_ok=True)
    for ex in tqdm(examples, desc="sweep", disable=not progress):
        try:
            if _is_done(done_dir, ex):
                continue
            _sweep_one(model, ex, done_dir, flows, window, lens)
        except BadExampleError as err:
            if bad_rows is None:
                raise
            bad_rows.append({"id": ex.id, "origin": ex.origin, "error": str(err)})
            continue
        if on_example is not None:
            on_example(ex)
    return collect(out_dir, [ex.id for ex in examples])


def collect(out_dir: str | Path, ids: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Gather the per-example files of a sweep into tables, in example order (finished ones only).

    Example:
        >>> collect("runs/shapes")["examples"]  # what a sweep has finished so far
    """
    done_dir = Path(out_dir) / "examples"
    ids = ids if ids is not None else sorted(p.name.split(".")[0] for p in done_dir.glob("*.examples.csv"))
    ids = [i for i in ids if (done_dir / f"{i}.examples.csv").exists()]
    tables = {}
    for name in TABLES:
        parts = [pd.read_csv(done_dir / f"{i}.{name}.csv") for i in ids if (done_dir / f"{i}.{name}.csv").exists()]
        tables[name] = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    return tables


def summary_table(knockout: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per category, flow and layer: n and, for every value column, its mean and confidence interval,
    named `{value}_mean`, `{value}_ci_low`, `{value}_ci_high` (units in the names: `rel_change_pct`
    in percent, `delta_log_prob` in nats). Value columns are the numeric ones other than layer,
    example, p_base and p_blocked, so a new metric column is summarised without changes here.
    Intervals follow `summarize_knockout` (bounded by what the metric can take, none for n < 5).

    Example:
        >>> runs = knockout_sweep(model, inputs, "image->last").assign(category="demo")
        >>> summary_table(runs.rename(columns={"rel_change": "rel_change_pct"})).columns[4]
        'rel_change_pct_mean'
    """
    from analyses.information_flow.stats import summarize_knockout

    skip = {"layer", "example", "p_base", "p_blocked"}
    values = [c for c in knockout.columns if c not in skip and pd.api.types.is_numeric_dtype(knockout[c])]
    return summarize_knockout(knockout, values, confidence, by=("category", "flow", "layer"))


def write_tables(
    out_dir: str | Path, tables: Mapping[str, pd.DataFrame], bad_rows: list[dict] | None = None
) -> list[Path]:
    """Write a sweep's tables as CSV files in `out_dir`: examples, knockout, lens, summary (when there
    are knockout rows) and errors (the skipped rows; a stale errors.csv is removed when none).

    Example:
        >>> write_tables("runs/shapes", collect("runs/shapes"))  # the paths written
    """
    out, written = Path(out_dir), []
    out.mkdir(parents=True, exist_ok=True)
    frames = {name: tables[name] for name in TABLES if name in tables and len(tables[name])}
    if "knockout" in frames:
        frames["summary"] = summary_table(frames["knockout"])
    if bad_rows:
        frames["errors"] = pd.DataFrame(bad_rows, columns=ERROR_COLUMNS)
    else:
        (out / "errors.csv").unlink(missing_ok=True)
    for name, frame in frames.items():
        _write_atomic(frame, out / f"{name}.csv")
        written.append(out / f"{name}.csv")
    return written
