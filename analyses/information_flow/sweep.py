"""Dataset-scale knockout sweeps (study B), resumable, over the Shapes world or a GQA task CSV.

Each example is written to its own files as soon as it is finished (each atomically, through a
temporary file of a unique name; its key file last, with the digest of the settings and of each
table), so a sweep that is killed and restarted skips what is done and ends with the same table.
A resume only reuses intact results computed with the same settings and example content (see
`analyses.information_flow.keys`); a folder holds one running sweep (`analyses.information_flow.lock`).
Like the study, only examples the model answers correctly are swept. Relative changes are in
percent everywhere (`rel_change_pct`), log-probability changes in nats (`delta_log_prob`).
The examples themselves (`SweepExample`, `shapes_examples`, `answer_token`, ...) are defined in
`analyses.information_flow.examples` and importable from here.
"""

from __future__ import annotations

import json
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
    id_problem,
    iter_rows,
    shapes_examples,
)
from analyses.information_flow.keys import (
    FORMAT,
    METRIC,
    _sha,
    claim_folder,
    example_key,
    model_fingerprint,
    settings_digest,
    write_atomic,
)
from analyses.information_flow.lock import sweep_lock
from hooked_llava import HookedLlava

__all__ = [
    "DEFAULT_FLOWS", "ERROR_COLUMNS", "LLAVA15_TEMPLATE", "STUDY_B_TEMPLATE", "TABLES", "BadExampleError",
    "SweepExample", "answer_token", "check_sweep_arguments", "collect", "iter_rows", "run_sweep", "shapes_examples",
    "summary_table", "sweep_settings", "write_tables",
]  # fmt: skip

DEFAULT_FLOWS = ["question->last", "image->last", "image->question", "last->last"]
TABLES = ("examples", "knockout", "lens")
ERROR_COLUMNS = ["id", "origin", "error"]
KEY = ".key.json"  # an example's key file, written after its tables: it marks the example finished


def _write_atomic(frame: pd.DataFrame, path: Path) -> None:
    write_atomic(path, frame.to_csv(index=False))


def _one(model: HookedLlava, ex: SweepExample, inputs: Any, target: int, flows: list[str], window: int,
         lens: bool) -> dict[str, pd.DataFrame]:  # fmt: skip
    from analyses.information_flow.attention_knockout import knockout_sweep
    from analyses.lens.logit import logit_lens, token_ranks

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


def _key(ex: SweepExample, settings: str) -> dict[str, Any]:
    """What a finished example is stored under: its content key and the digest of the sweep's settings.
    An id that cannot name a file is a `BadExampleError` (it is skipped like any bad row)."""
    problem = id_problem(ex.id)
    if problem:
        raise BadExampleError(f"{ex.origin or repr(ex.id)}: the example id {ex.id!r} cannot name a file ({problem}).")
    return {"content": _guarded("key", ex, lambda: example_key(ex)), "settings": settings}


def _is_done(done_dir: Path, ex: SweepExample, key: Mapping[str, Any]) -> bool:
    """Finished, intact, with the same content and settings; anything else is (re)computed, with a warning
    saying why when a stored result is set aside."""
    stored, why = _stored(done_dir, ex.id)
    if stored is not None and stored.get("settings") != key["settings"]:
        why = "was computed with other settings"
    elif stored is not None and stored.get("content") != json.loads(json.dumps(key["content"])):
        why = "changed since it was swept"
    elif stored is not None:
        return True
    if why:
        warnings.warn(f"example {ex.id} {why}: recomputing it.", stacklevel=3)
    return False


def _stored(done_dir: Path, ex_id: str) -> tuple[dict[str, Any] | None, str]:
    """The key of a finished example whose tables are intact, or None and why it does not count
    ("" when it was never finished). The key file is written last, with each table's digest."""
    marker = done_dir / f"{ex_id}{KEY}"
    try:
        stored = json.loads(marker.read_bytes())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError) as err:  # ValueError: truncated JSON, bad UTF-8
        return None, f"has a damaged stored result: its key {marker.name} is unreadable ({err})"
    tables = stored.get("tables") if isinstance(stored, dict) else None
    if not isinstance(tables, dict) or "examples" not in tables or not set(tables) <= set(TABLES):
        return None, f"has a damaged stored result: its key {marker.name} is incomplete"
    for name, digest in tables.items():
        path = done_dir / f"{ex_id}.{name}.csv"
        try:
            data = path.read_bytes()
        except OSError:
            return None, f"has a damaged stored result: its table {path.name} is missing"
        if _sha(data) != digest:
            return None, f"has a damaged stored result: {path.name} is truncated or changed since it was written"
    return stored, ""


def _compute(model: HookedLlava, ex: SweepExample, flows: list[str], window: int,
             lens: bool) -> dict[str, pd.DataFrame]:  # fmt: skip
    """One example's tables (what a Ray worker returns); a bad image, prompt or answer is a `BadExampleError`."""
    image = _guarded("pixels", ex, ex.load_image)
    try:
        target = answer_token(model, ex.answer)
        inputs = model.prepare(images=[image], prompts=[ex.prompt], boxes=[ex.boxes])
    except ValueError as err:  # unknown answer or question word, an image prepare cannot scale, a bad box
        raise BadExampleError(f"{ex.origin or ex.id}: {str(err).strip().splitlines()[0]}") from err
    return _one(model, ex, inputs, target, flows, window, lens)


def _store(done_dir: Path, ex_id: str, key: Mapping[str, Any], results: Mapping[str, pd.DataFrame]) -> None:
    """Write one example's tables, each atomically, then its key with their digests: the key marks it done."""
    (done_dir / f"{ex_id}{KEY}").unlink(missing_ok=True)  # not done while its tables change
    digests = {}
    for name in TABLES:
        path = done_dir / f"{ex_id}.{name}.csv"
        path.unlink(missing_ok=True)  # a stale table of a changed example goes
        if name in results:
            text = results[name].to_csv(index=False)
            write_atomic(path, text)
            digests[name] = _sha(text.encode())
    write_atomic(done_dir / f"{ex_id}{KEY}", json.dumps({**key, "tables": digests}))


def _sweep_one(model: HookedLlava, ex: SweepExample, done_dir: Path, key: Mapping[str, Any], flows: list[str],
               window: int, lens: bool) -> None:  # fmt: skip
    _store(done_dir, ex.id, key, _compute(model, ex, flows, window, lens))


def check_sweep_arguments(flows: list[str], window: int) -> None:
    """Refuse unknown flows or roles and a window below 1 (before a folder records them).

    Example:
        >>> check_sweep_arguments(["image->last", "question->last"], 9)  # ["image->lats"]: ValueError naming 'lats'
    """
    from analyses import ranges
    from analyses.information_flow.flows import resolve_flows
    from hooked_llava.inputs.llava_inputs import ROLES

    for name, pair in resolve_flows(flows).items():
        bad = [r for r in pair if isinstance(r, str) and r not in ROLES]
        if bad:
            raise ValueError(f"unknown flow {name!r}: unknown role {bad[0]!r}; roles are {', '.join(ROLES)}.")
    ranges.count(window, "window")


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
    metric, and `data`) and one sweep at a time: a second sweep into a folder in use is refused
    with `SweepLockedError` (see `analyses.information_flow.lock`). Rerunning with other settings
    raises `SettingsChangedError` naming what changed, unless `force` (then the old results are
    deleted). A finished example counts only when its stored tables are intact and were computed
    with these settings and the same content (prompt, answer, category, boxes, image bytes);
    otherwise it is recomputed, with a warning saying why.

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
    examples, flows = list(examples), list(flows or DEFAULT_FLOWS)
    check_sweep_arguments(flows, window)  # a bad flow or window fails here, before the folder records it
    _check_ids(examples)
    with sweep_lock(out_dir):
        settings = sweep_settings(model, flows, window, lens, data)
        claim_folder(out_dir, settings, force)
        done_dir = Path(out_dir) / "examples"
        done_dir.mkdir(parents=True, exist_ok=True)
        digest = settings_digest(settings)
        for ex in tqdm(examples, desc="sweep", disable=not progress):
            try:
                key = _key(ex, digest)
                if _is_done(done_dir, ex, key):
                    continue
                _sweep_one(model, ex, done_dir, key, flows, window, lens)
            except BadExampleError as err:
                if bad_rows is None:
                    raise
                bad_rows.append({"id": ex.id, "origin": ex.origin, "error": str(err)})
                continue
            if on_example is not None:
                on_example(ex)
        return collect(out_dir, [ex.id for ex in examples])


def collect(out_dir: str | Path, ids: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Gather the per-example files of a sweep into tables, in example order: the finished ones whose
    tables are intact and were computed with the folder's settings (others are left out, with a warning).

    Example:
        >>> collect("runs/shapes")["examples"]  # what a sweep has finished so far
    """
    done_dir = Path(out_dir) / "examples"
    if ids is None:
        ids = sorted(p.name[: -len(KEY)] for p in done_dir.glob(f"*{KEY}")) if done_dir.is_dir() else []
    parts: dict[str, list[pd.DataFrame]] = {name: [] for name in TABLES}
    settings = _folder_digest(Path(out_dir))
    for i in ids:
        if id_problem(i):
            continue
        stored, why = _stored(done_dir, i)
        if stored is not None and settings is not None and stored.get("settings") != settings:
            stored, why = None, "was computed with other settings than the folder's"
        if stored is None:
            if why:
                warnings.warn(f"example {i} {why}: left out (a resumed sweep recomputes it).", stacklevel=2)
            continue
        for name in stored["tables"]:
            parts[name].append(pd.read_csv(done_dir / f"{i}.{name}.csv"))
    return {name: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame() for name, frames in parts.items()}


def _folder_digest(out: Path) -> str | None:
    """The digest of the folder's settings.json, None when it cannot be read."""
    try:
        return settings_digest(json.loads((out / "settings.json").read_bytes()))
    except (OSError, ValueError, TypeError):
        return None


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
