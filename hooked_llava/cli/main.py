"""The `hooked-llava` command line.

    hooked-llava explain [--model NAME] [--image FILE] [--question TEXT | --prompt TEXT]
                         [--seed N --category C --index I] [--flows F,G] [--out DIR] [--debug]
    hooked-llava quickstart [--model shapes-llava]

`quickstart` loads a model (the shipped Shapes LLaVA by default, or a tiny random one when no
checkpoint is shipped), asks a question about a generated scene, and shows what the library
exposes: the answer, the hook names, and where the answer forms across layers. `explain` writes
an HTML report about one answer (see `analyses.report.explain`). A user mistake (unknown model, missing
image, unwritable folder, bad flow, empty question) is one line on stderr and exit status 2;
`--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from hooked_llava.cli.arguments import (
    DEFAULT_SCENE,
    UsageError,
    build_inputs,
    check_flows,
    check_image,
    check_out,
    load_model,
    scene,
)


def _default(args: argparse.Namespace):
    """The model and the default example: a Shapes question (study A's Colour format, answer prefix included)."""
    from hooked_llava.loading.pretrained import SHIPPED

    name = args.model or "shapes-llava"
    if name == "shapes-llava" and not (SHIPPED / name).is_dir():
        from hooked_llava.testing import tiny_model

        print("(no shipped Shapes checkpoint found: using a tiny random LLaVA)")
        return tiny_model()[0]
    return load_model(name)


def quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model = _default(args)
    print(
        f"loaded {model.cfg.original_architecture}: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}, {len(model.hook_dict)} hook points"
    )
    inputs = build_inputs(model, args, scene(DEFAULT_SCENE), None)
    question = model.tokenizer.decode(inputs.input_ids[0][inputs.mask("question")[0]]).strip()
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    probs = logits[0, inputs.last[0]].float().softmax(-1)
    answer = int(probs.argmax())
    print(f"Q: {question}\nA: {model.tokenizer.decode([answer])!r} (p = {probs[answer]:.3f})")
    if inputs.pixel_values is not None:
        print(f"image tokens: {int(inputs.mask('image').sum())} on a {inputs.grid_size}×{inputs.grid_size} grid")
    print(f"question tokens: {model.to_str_tokens(inputs.input_ids[0][inputs.mask('question')[0]])}")
    print("logit lens at the last position (rank of the answer after each layer, 1 = top):")
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"][0, inputs.last[0]]
        lens = model.unembed(model.ln_final(resid[None, None]))[0, 0]
        rank = int((lens > lens[answer]).sum()) + 1
        print(f"  layer {layer:2d}: rank {rank:4d}  p = {lens.softmax(-1)[answer]:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def explain(args: argparse.Namespace) -> int:
    from analyses.report.explain import explain as run_explain
    from analyses.report.explain import write_html

    start = time.perf_counter()
    for flag in ("question", "prompt"):
        if getattr(args, flag) is not None and not getattr(args, flag).strip():
            raise UsageError(f"--{flag} is empty: give the text, or leave --{flag} out to use the default scene.")
    image = check_image(args.image) if args.image else None
    flows = check_flows(args.flows) if args.flows else None
    example = scene((args.seed, args.category, args.index))
    replacing = check_out(args.out)
    model = _default(args)
    inputs = build_inputs(model, args, example, image)
    if flows and inputs.pixel_values is None and any("image" in f or "related" in f or "other" in f for f in flows):
        raise UsageError(f"--flows {args.flows}: this model reads no image, so image flows do not apply.")
    print(f"explaining {inputs.texts[0] if inputs.texts else args.prompt!r} with {args.model or 'shapes-llava'}")
    report = run_explain(
        model, inputs, say=lambda msg: print(msg, flush=True), flows=flows, model_name=args.model or "shapes-llava"
    )
    if replacing:
        print(f"replacing the existing report in {args.out}")
    path = write_html(report, args.out)
    print(f"answer: {report.answer} (token id {report.answer_id}, p = {report.probability:.3f})")
    print(f"report written to {path} ({time.perf_counter() - start:.1f}s)")
    return 0


def _sweep_examples(args: argparse.Namespace, bad_rows: list | None) -> tuple[list, dict]:
    """The examples, and what the folder's settings record about where they come from."""
    from analyses.information_flow.gqa import gqa_examples
    from analyses.information_flow.sweep import shapes_examples

    if args.csv:
        return gqa_examples(args.csv, args.images, category=args.category, bad_rows=bad_rows), {"source": "csv"}
    return shapes_examples(args.shapes, seed=args.seed), {"source": "shapes", "seed": args.seed}


def _write_sweep(out: Path, tables: dict, bad_rows: list | None) -> None:
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


def sweep(args: argparse.Namespace) -> int:
    """Run (or resume) a sweep and write examples/knockout/lens/summary/errors CSVs and sweep.png.

    A bad CSV row (missing or unreadable image, bad box, unknown answer) stops the sweep with a
    message naming the row, after writing the tables of the finished examples; with
    --skip-bad-rows it is skipped and listed in errors.csv. Other settings than the folder's are
    refused unless --force (see `analyses.information_flow.keys`). Rel. changes are in %, `delta_log_prob` in nats.
    With --ray the examples are sharded over Ray actors that each load --model (`analyses.information_flow.ray_sweep`).
    """
    from analyses.information_flow.gqa import GQAFormatError
    from analyses.information_flow.keys import SettingsChangedError
    from analyses.information_flow.sweep import BadExampleError, collect, run_sweep
    from hooked_llava.model.hooked_llava import HookedLlava

    if args.workers is not None and not args.ray:
        print("hooked-llava sweep: --workers needs --ray (Ray workers); without it the sweep runs in this process",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.workers is not None and args.workers < 1:
        print(f"hooked-llava sweep: --workers must be at least 1 (got {args.workers})", file=sys.stderr)
        return 2
    if args.csv and not args.images:
        print("hooked-llava sweep: --csv needs --images, the folder of the CSV's images", file=sys.stderr)
        return 2
    bad_rows: list | None = [] if args.skip_bad_rows else None
    try:
        examples, data = _sweep_examples(args, bad_rows)  # a bad CSV is reported before the model loads
    except GQAFormatError as err:
        print(f"hooked-llava sweep: {err} (--skip-bad-rows skips such rows)", file=sys.stderr)
        return 2
    flows = args.flows.split(",") if args.flows else None
    out, failure = Path(args.out), None
    settings = dict(flows=flows, window=args.window, lens=args.lens, data=data, force=args.force, bad_rows=bad_rows)
    try:
        if args.ray:  # the actors load the model; the driver only keeps the store
            from analyses.information_flow.ray_sweep import run_sweep_ray

            tables = run_sweep_ray(args.model, examples, out, workers=args.workers, address=args.ray, **settings)
        else:
            tables = run_sweep(HookedLlava.from_pretrained(args.model), examples, out, **settings)
    except (SettingsChangedError, ImportError) as err:  # ImportError: --ray without the ray extra
        print(f"hooked-llava sweep: {err}", file=sys.stderr)
        return 2
    except BadExampleError as err:  # keep what is finished: write the tables of the finished examples
        failure, tables = err, collect(out, [ex.id for ex in examples])
    _write_sweep(out, tables, bad_rows)
    if failure is not None:
        print(f"hooked-llava sweep: {failure} (tables of the finished examples written; --skip-bad-rows skips "
              "such rows)", file=sys.stderr)  # fmt: skip
        return 2
    return 0


def _explain_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    seed, category, index = DEFAULT_SCENE
    exp = sub.add_parser(
        "explain", parents=[common], help="explain one answer in an HTML report (default: the shipped Shapes model)"
    )
    exp.add_argument("--model", default=None, help="shipped name, local directory or hub id (default shapes-llava)")
    exp.add_argument("--image", default=None, help="an image file (default: the generated Shapes scene)")
    exp.add_argument("--question", default=None, help="the question, put in the model's prompt format")
    exp.add_argument("--prompt", default=None, help="a full prompt containing <image> instead of --question")
    exp.add_argument("--seed", type=int, default=seed, help=f"Shapes world of the scene (default {seed})")
    exp.add_argument("--category", default=category, help=f"Shapes question category (default {category})")
    exp.add_argument("--index", type=int, default=index, help=f"example index in that world (default {index})")
    exp.add_argument("--flows", default=None, help="comma-separated knockout flows (default: the four main ones)")
    exp.add_argument("--out", default="hooked-llava-report", help="output directory (report.html, PNGs, CSVs)")
    exp.set_defaults(run=explain)


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="hooked-llava", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", parents=[common], help="run a question through a model and show its internals")
    quick.add_argument("--model", default=None, help="shipped name, local directory or hub id")
    quick.set_defaults(run=quickstart)
    _explain_parser(sub, common)
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
    sw.add_argument("--window", type=int, default=9)
    sw.add_argument("--lens", action="store_true", help="also record the logit lens at the last position")
    sw.add_argument("--out", default="hooked-llava-sweep", help="output folder; a rerun with the same settings resumes")
    sw.add_argument("--force", action="store_true", help="delete results computed with other settings in --out")
    sw.add_argument("--skip-bad-rows", action="store_true", help="skip unreadable rows, listing them in errors.csv")
    sw.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                    help="shard examples over Ray workers (at ADDRESS, else RAY_ADDRESS or local)")  # fmt: skip
    sw.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per GPU, else 1)")
    sw.set_defaults(run=sweep)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"hooked-llava {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
