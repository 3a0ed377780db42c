"""The `hooked-llava sweep` command: study B's knockout flows over Shapes categories or a GQA task CSV.

    hooked-llava sweep [--model NAME] [--shapes N --seed S | --csv FILE --images DIR [--category C]]
                       [--flows F,G] [--window W] [--lens] [--out DIR] [--force] [--skip-bad-rows]
                       [--ray [ADDRESS] [--workers N]] [--debug]

Every user mistake is a `UsageError` (one line on stderr, exit status 2), found before the model
loads where it can be: flags (`--window`, `--shapes`, `--workers` and the flows), the CSV and its
image folder, `--out`, the model's name, and a folder in use by another sweep. The folder stays
locked from before the model loads until the tables are written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hooked_llava.cli.arguments import UsageError, check_flows, check_out, load_model


def _check_flags(args: argparse.Namespace) -> list[str] | None:
    """The flags that need nothing read: counts, their combinations, the flows."""
    if args.workers is not None and not args.ray:
        raise UsageError("--workers needs --ray (Ray workers); without it the sweep runs in this process.")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be at least 1 (got {args.workers}).")
    if args.window < 1:
        raise UsageError(f"--window must be at least 1 (got {args.window}): the number of layers blocked at a time.")
    if args.csv is None and args.shapes < 1:
        raise UsageError(f"--shapes must be at least 1 (got {args.shapes}): the examples per Shapes category.")
    if args.csv is not None:
        if not args.images:
            raise UsageError("--csv needs --images, the folder of the CSV's images.")
        if not Path(args.csv).is_file():
            raise UsageError(f"--csv {args.csv}: no such file.")
        if not Path(args.images).is_dir():
            raise UsageError(f"--images {args.images}: no such folder.")
    return check_flows(args.flows) if args.flows is not None else None


def check_model_name(name: str) -> None:
    """For --ray, whose workers load the model: refuse a name that names no model, without loading it
    (a local folder or a shipped name is checked here; a hub id `org/name` is left to the workers)."""
    from hooked_llava.loading.resolve import looks_like_path, resolve

    if Path(name).expanduser().is_dir() or not (looks_like_path(name) or "/" not in name):
        return
    try:
        resolve(name)  # without a "/" or for a path, this never asks the hub
    except FileNotFoundError as err:
        raise UsageError(f"--model {name!r}: unknown model: {str(err).strip().splitlines()[0]}") from err


def _examples(args: argparse.Namespace, bad_rows: list | None) -> tuple[list, dict]:
    """The examples, and what the folder's settings record about where they come from."""
    from analyses.information_flow.gqa import GQAFileError, GQAFormatError, gqa_examples
    from analyses.information_flow.sweep import shapes_examples

    if not args.csv:
        return shapes_examples(args.shapes, seed=args.seed), {"source": "shapes", "seed": args.seed}
    try:
        return gqa_examples(args.csv, args.images, category=args.category, bad_rows=bad_rows), {"source": "csv"}
    except GQAFileError as err:
        raise UsageError(str(err)) from err
    except GQAFormatError as err:
        raise UsageError(f"{err} (--skip-bad-rows skips such rows)") from err


def _write(out: Path, tables: dict, bad_rows: list | None) -> None:
    """Write the tables and the figure, and say what is in them."""
    from analyses.information_flow.sweep import write_tables
    from analyses.plotting.flows import plot_sweep

    write_tables(out, tables, bad_rows)
    done = tables["examples"]
    if len(done):
        print(f"{len(done)} examples, {int(done['correct'].sum())} answered correctly and swept")
        print(done.groupby("category")["correct"].agg(["size", "mean"]).rename(columns={"mean": "accuracy"}))
    if bad_rows:
        print(f"{len(bad_rows)} bad rows skipped: see {out / 'errors.csv'}")
    if len(tables["knockout"]):
        plot_sweep(tables["knockout"], title="attention knockout").savefig(out / "sweep.png", dpi=120)
        print(f"tables in {out} (relative change in %, log-probability change in nats); figure: {out / 'sweep.png'}")


def _run(args: argparse.Namespace, examples: list, out: Path, settings: dict[str, Any]) -> dict:
    from analyses.information_flow.sweep import run_sweep

    if args.ray:  # the actors load the model; the driver only keeps the store
        from analyses.information_flow.ray_sweep import run_sweep_ray

        check_model_name(args.model)
        try:
            return run_sweep_ray(args.model, examples, out, workers=args.workers, address=args.ray, **settings)
        except ImportError as err:  # --ray without the ray extra
            raise UsageError(str(err)) from err
    return run_sweep(load_model(args.model), examples, out, **settings)


def sweep(args: argparse.Namespace) -> int:
    """Run (or resume) a sweep and write examples/knockout/lens/summary/errors CSVs and sweep.png.

    A bad CSV row (missing or unreadable image, bad box, empty or unsafe id, empty question,
    unknown word or answer, a wrong number of fields) stops the sweep with a message naming the
    row, after writing the tables of the finished examples; with --skip-bad-rows it is skipped and
    listed in errors.csv. Other settings than the folder's are refused unless --force (see
    `analyses.information_flow.keys`); a folder in use by another sweep is refused. Rel. changes are
    in %, `delta_log_prob` in nats. With --ray the examples are sharded over Ray actors that each
    load --model (`analyses.information_flow.ray_sweep`).
    """
    from analyses.information_flow.keys import SweepFolderError
    from analyses.information_flow.lock import sweep_lock
    from analyses.information_flow.sweep import BadExampleError, collect

    flows = _check_flags(args)
    check_out(args.out, "the sweep's tables")
    bad_rows: list | None = [] if args.skip_bad_rows else None
    examples, data = _examples(args, bad_rows)  # a bad CSV is reported before the model loads
    out, failure = Path(args.out), None
    settings = dict(flows=flows, window=args.window, lens=args.lens, data=data, force=args.force, bad_rows=bad_rows)
    try:
        with sweep_lock(out):  # held until the tables are written: they are this run's
            try:
                tables = _run(args, examples, out, settings)
            except BadExampleError as err:  # keep what is finished: write the tables of the finished examples
                failure, tables = err, collect(out, [ex.id for ex in examples])
            _write(out, tables, bad_rows)
    except SweepFolderError as err:  # in use, other settings, a damaged settings.json
        raise UsageError(str(err)) from err
    if failure is not None:
        raise UsageError(f"{failure} (tables of the finished examples written; --skip-bad-rows skips such rows)")
    return 0


def add_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """The `sweep` subcommand's flags."""
    sw = sub.add_parser(
        "sweep", parents=[common], help="knockout flows over a dataset (Shapes categories or a GQA task CSV)"
    )
    sw.add_argument("--model", default="shapes-llava")
    sw.add_argument("--shapes", type=int, default=50, help="Shapes examples per category (without --csv)")
    sw.add_argument("--seed", type=int, default=777, help="Shapes world seed (part of the example ids)")
    sw.add_argument("--csv", default=None, help="a task CSV in study B's GQA format")
    sw.add_argument("--images", default=None, help="folder of the CSV's images ({img_id}.jpg)")
    sw.add_argument("--category", default=None, help="category label (default: from the CSV file name)")
    sw.add_argument("--flows", default=None, help="comma-separated flows (default: the four main ones)")
    sw.add_argument("--window", type=int, default=9, help="layers blocked at a time (study B: 9)")
    sw.add_argument("--lens", action="store_true", help="also record the logit lens at the last position")
    sw.add_argument("--out", default="hooked-llava-sweep", help="output folder; a rerun with the same settings resumes")
    sw.add_argument("--force", action="store_true", help="delete results computed with other settings in --out")
    sw.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows, listing them in errors.csv")
    sw.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                    help="shard examples over Ray workers (at ADDRESS, else RAY_ADDRESS or local)")  # fmt: skip
    sw.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else 1)")
    sw.set_defaults(run=sweep)
