"""The `hooked-llava` command line.

    hooked-llava explain [--model NAME] [--image FILE] [--question TEXT | --prompt TEXT] [--out DIR]
    hooked-llava quickstart [--model shapes-llava]

`quickstart` loads a model (the shipped Shapes LLaVA by default, or a tiny random one when no
checkpoint is shipped), asks a question about a generated scene, and shows what the library
exposes: the answer, the hook names, and where the answer forms across layers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _load(name: str | None):
    """The model, and a default image and prompt (a Shapes colour question, study A's format)."""
    from .inputs import LLAVA15_TEMPLATE
    from .loading import SHIPPED
    from .model import HookedLlava

    name = name or "shapes-llava"
    if name == "shapes-llava" and not (SHIPPED / name).is_dir():
        from .testing import random_images, tiny_model

        print("(no shipped Shapes checkpoint found: using a tiny random LLaVA)")
        model, _ = tiny_model()
        question = "What is the color of the circle?"
        return model, random_images(1)[0], LLAVA15_TEMPLATE.format(question=question)
    model = HookedLlava.from_pretrained(name)
    from .shapes import ShapesWorld

    example = ShapesWorld(seed=2024).example(0, "Colour")
    return model, example.image, example.prompt


def quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model, image, prompt = _load(args.model)
    print(
        f"loaded {model.cfg.original_architecture}: {model.cfg.n_layers} layers × {model.cfg.n_heads} heads, "
        f"d_model {model.cfg.d_model}, {len(model.hook_dict)} hook points"
    )
    inputs = model.prepare(images=[image], prompts=[prompt])
    question = " ".join(model.to_str_tokens(inputs.input_ids[0][inputs.mask("question")[0]]))
    with torch.no_grad():
        logits, cache = model.run_with_cache(inputs)
    probs = logits[0, -1].softmax(-1)
    answer = int(probs.argmax())
    print(f"Q: {question}\nA: {model.to_string([answer])!r} (p = {probs[answer]:.3f})")
    print(
        f"image tokens: {int(inputs.mask('image').sum())} on a {inputs.grid_size}×{inputs.grid_size} grid; "
        f"question tokens: {model.to_str_tokens(inputs.input_ids[0][inputs.mask('question')[0]])}"
    )
    print("logit lens at the last position (rank of the answer after each layer):")
    for layer in range(model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"][0, -1]
        lens = model.unembed(model.ln_final(resid[None, None]))[0, 0]
        rank = int((lens > lens[answer]).sum())
        print(f"  layer {layer:2d}: rank {rank:4d}  p = {lens.softmax(-1)[answer]:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s")
    return 0


def explain(args: argparse.Namespace) -> int:
    from analyses.explain import explain as run_explain
    from analyses.explain import write_html

    start = time.perf_counter()
    model, image, prompt = _load(args.model)
    if args.image:
        from PIL import Image

        image = Image.open(args.image).convert("RGB")
    if args.question:
        inputs = model.prepare(images=[image], questions=[args.question])
    else:
        inputs = model.prepare(images=[image], prompts=[args.prompt or prompt])
    print(f"explaining {inputs.texts[0]!r} with {model.cfg.original_architecture} ({model.cfg.n_layers} layers)")
    report = run_explain(model, inputs, say=lambda msg: print(msg, flush=True))
    path = write_html(report, args.out)
    print(f"answer: {report.answer!r} (p = {report.probability:.3f})")
    print(f"report written to {path} ({time.perf_counter() - start:.1f}s)")
    return 0


def sweep(args: argparse.Namespace) -> int:
    from analyses.gqa import gqa_examples
    from analyses.knockout import summarize_knockout
    from analyses.plot_flows import plot_sweep
    from analyses.sweep import run_sweep, shapes_examples

    from .model import HookedLlava

    model = HookedLlava.from_pretrained(args.model)
    if args.csv:
        if not args.images:
            raise SystemExit("--csv needs --images, the folder of the CSV's images")
        examples = gqa_examples(args.csv, args.images, category=args.category)
    else:
        examples = shapes_examples(args.shapes, seed=args.seed)
    flows = args.flows.split(",") if args.flows else None
    tables = run_sweep(model, examples, args.out, flows=flows, window=args.window, lens=args.lens)
    out = Path(args.out)
    for name, table in tables.items():
        if len(table):
            table.to_csv(out / f"{name}.csv", index=False)
    done = tables["examples"]
    print(f"{len(done)} examples, {int(done['correct'].sum())} answered correctly and swept")
    print(done.groupby("category")["correct"].agg(["size", "mean"]).rename(columns={"mean": "accuracy"}))
    if len(tables["knockout"]):
        frame = tables["knockout"].rename(columns={"id": "example"})
        summarize_knockout(frame).to_csv(out / "summary.csv", index=False)
        plot_sweep(tables["knockout"], title="attention knockout").savefig(out / "sweep.png", dpi=120)
        print(f"figure: {out / 'sweep.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hooked-llava", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="run a question through a model and show its internals")
    quick.add_argument("--model", default=None, help="shipped name, local directory or hub id")
    quick.set_defaults(run=quickstart)
    exp = sub.add_parser("explain", help="explain one answer in an HTML report (default: the shipped Shapes model)")
    exp.add_argument("--model", default=None, help="shipped name, local directory or hub id (default shapes-llava)")
    exp.add_argument("--image", default=None, help="an image file (default: a generated Shapes scene)")
    exp.add_argument("--question", default=None, help="the question, put in the LLaVA-1.5 template")
    exp.add_argument("--prompt", default=None, help="a full prompt containing <image> instead of --question")
    exp.add_argument("--out", default="hooked-llava-report", help="output directory (report.html and PNGs)")
    exp.set_defaults(run=explain)
    sw = sub.add_parser("sweep", help="knockout flows over a dataset (Shapes categories or a GQA task CSV)")
    sw.add_argument("--model", default="shapes-llava")
    sw.add_argument("--shapes", type=int, default=50, help="Shapes examples per category (without --csv)")
    sw.add_argument("--seed", type=int, default=777, help="Shapes world seed")
    sw.add_argument("--csv", default=None, help="a task CSV in study B's GQA format")
    sw.add_argument("--images", default=None, help="folder of the CSV's images ({img_id}.jpg)")
    sw.add_argument("--category", default=None, help="category label (default: from the CSV file name)")
    sw.add_argument("--flows", default=None, help="comma-separated flows (default: the four main ones)")
    sw.add_argument("--window", type=int, default=9)
    sw.add_argument("--lens", action="store_true", help="also record the logit lens at the last position")
    sw.add_argument("--out", default="hooked-llava-sweep", help="output folder; rerunning resumes")
    sw.set_defaults(run=sweep)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
