"""The `hooked-llava` command line.

    hooked-llava explain [--model NAME] [--image FILE] [--question TEXT | --prompt TEXT]
                         [--seed N --category C --index I] [--flows F,G] [--out DIR] [--debug]
    hooked-llava quickstart [--model shapes-llava]
    hooked-llava sweep ... (see `hooked_llava.cli.sweep`)

`quickstart` loads a model (the shipped Shapes LLaVA by default, or a tiny random one when no
checkpoint is shipped), asks a question about a generated scene, and shows what the library
exposes: the answer, the hook names, and where the answer forms across layers. `explain` writes
an HTML report about one answer (see `analyses.report.explain`); `sweep` runs study B's knockout over
a dataset. A user mistake (unknown model, missing image, unwritable folder, bad flow, empty question, a
folder in use) is one line on stderr and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time

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
from hooked_llava.cli.sweep import add_parser as add_sweep_parser


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
    add_sweep_parser(sub, common)
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
