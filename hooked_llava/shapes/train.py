"""Train the Shapes LLaVA from scratch: the LLaVA recipe in miniature, on two CPU cores.

1. CLIP: a tiny ``CLIPModel`` trained contrastively on scenes and their captions, with a
   region-text term (each object's patches against object phrases); only the vision tower is kept.
2. Base LM: a tiny ``LlamaForCausalLM`` trained on scene descriptions and text-only QA.
3. Projector alignment: vision tower and LM frozen, the projector trained on captioning.
4. Visual instruction tuning: vision tower frozen, projector and LM trained on visual QA,
   with some text-only QA kept so that the LLaVA still answers it.

Run ``python -m hooked_llava.shapes.train --out DIR --seed 0``; it writes ``DIR/shapes-lm`` and
``DIR/shapes-llava`` in HF format and logs stage, step, loss and elapsed time to stdout.
Every random draw comes from the seed, so a re-run reproduces the result.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from hooked_llava.shapes.loop import Logger, quick_check
from hooked_llava.shapes.recipe import Recipe, smoke_recipe
from hooked_llava.shapes.stages import assemble, train_align, train_clip, train_lm, train_tune
from hooked_llava.shapes.tokenizer import build_processor


def train(
    out: str | Path,
    seed: int = 0,
    recipe: Recipe | None = None,
    threads: int = 2,
    check: int = 100,
    reuse_lm: str | Path | None = None,
) -> dict:
    """Run the four stages and save ``out/shapes-lm`` and ``out/shapes-llava``.

    Args:
        out: Output directory.
        seed: Seed of every random draw (data, initialisation).
        recipe: Stage settings; ``Recipe()`` by default.
        threads: CPU threads for torch.
        check: Validation questions per category after stages 2 and 4 (0 to skip).
        reuse_lm: A ``shapes-lm`` directory from an earlier run with the same seed, threads and
            stage-2 settings, used instead of retraining stage 2 (which does not depend on stage 1,
            so the result is the same); its recorded stage-2 time is kept.

    Returns:
        A summary: seed, recipe, time per stage and the validation accuracies.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # the process keeps its own thread count afterwards
        return _train(Path(out), seed, recipe or Recipe(), threads, check, reuse_lm)
    finally:
        torch.set_num_threads(before)


def _train(out: Path, seed: int, recipe: Recipe, threads: int, check: int, reuse_lm: str | Path | None) -> dict:
    log, times, checks, cpu0 = Logger(), {}, {}, time.process_time()
    processor = build_processor()
    log(f"training Shapes LLaVA, seed {seed}, {threads} threads, recipe {recipe.to_dict()}")

    def timed(stage: str, fn, *args):
        t = time.time()
        result = fn(*args)
        times[stage] = round(time.time() - t, 1)
        return result

    clip = timed("1_clip", train_clip, recipe, seed, log)
    if reuse_lm is None:
        lm, bind_steps = timed("2_lm", train_lm, recipe, seed, log)
    else:
        lm, bind_steps = reuse(Path(reuse_lm), recipe, seed, threads, times, log)
    if check:
        checks["lm_text"] = quick_check("lm text", lm, processor.tokenizer, False, check, log)
    llava = assemble(clip, lm)
    timed("3_align", train_align, llava, recipe, seed, log)
    timed("4_tune", train_tune, llava, recipe, seed, log)
    if check:
        checks["llava_visual"] = quick_check("llava visual", llava, processor, True, check, log)
        checks["llava_text"] = quick_check("llava text", llava, processor, False, check, log)
    summary = {"seed": seed, "threads": threads, "recipe": recipe.to_dict(), "bind_steps": bind_steps}
    summary |= {"seconds": times, "checks": checks, "stage2_reused": reuse_lm is not None}
    summary["seconds"]["total"] = round(sum(times.values()), 1)
    summary["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # all threads; wall time suffers from other load
    save(Path(out), lm.eval(), llava.eval(), processor, summary)
    log(f"saved to {out}; training took {summary['seconds']['total']:.0f} s")
    return summary


def reuse(path: Path, recipe: Recipe, seed: int, threads: int, times: dict, log: Logger):
    """Load stage 2's output from an earlier run, refusing one made with other settings."""
    before = json.loads((path / "training.json").read_text())
    mine = recipe.to_dict()
    same = ("bind", "bind_until", "lm", "embed_init", "caption_prob", "text_weight", "describe_loss")
    differ = [k for k in same if before["recipe"].get(k) != mine[k]]
    if before["seed"] != seed or before["threads"] != threads or differ:
        raise ValueError(f"{path} was trained with other stage-2 settings ({differ or 'seed or threads'})")
    times["2_lm"] = before["seconds"]["2_lm"]
    log(f"reusing the stage-2 LM from {path} (trained in {times['2_lm']:.0f} s)")
    return LlamaForCausalLM.from_pretrained(path).train(), before["bind_steps"]


def save(out: Path, lm, llava, processor, summary: dict) -> None:
    """Write both checkpoints in HF format (safetensors), with a training summary each."""
    for name, model, proc in (("shapes-lm", lm, processor.tokenizer), ("shapes-llava", llava, processor)):
        path = out / name
        model.save_pretrained(path)
        proc.save_pretrained(path)
        (path / "training.json").write_text(json.dumps(summary, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Train the Shapes LLaVA (all four stages) on CPU.")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every stage's step count")
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps of each stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check", type=int, default=100, help="validation questions per category (0: none)")
    parser.add_argument("--probe-every", type=int, default=0, help="validation check every N steps of stages 2 and 4")
    parser.add_argument("--tune-lr", type=float, default=None, help="learning rate of stage 4")
    parser.add_argument("--reuse-lm", default=None, help="a shapes-lm directory from a run with the same stage 2")
    args = parser.parse_args(argv)
    recipe = smoke_recipe() if args.smoke else Recipe(probe_every=args.probe_every).scaled(args.scale)
    if args.tune_lr is not None:
        recipe = replace(recipe, tune=replace(recipe.tune, lr=args.tune_lr))
    return train(args.out, args.seed, recipe, args.threads, 0 if args.smoke else args.check, args.reuse_lm)


if __name__ == "__main__":
    main()
