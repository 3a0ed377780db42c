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
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration

from .data import (
    ANSWER,
    TEXT,
    answer_branch,
    collate,
    encode,
    pack,
    pixel_values,
    qa_sequence,
    scene_questions,
    visual_prefix,
)
from .evaluate import EVAL_SEED, correct
from .questions import CAPTION_QUESTION, CATEGORIES, make_dataset
from .recipe import FEATURE_LAYER, Recipe, Stage, clip_config, llava_config, smoke_recipe, text_config
from .tokenizer import BOS, EOS, PAD, VOCAB, build_processor
from .world import COLORS, SHAPES, ShapesWorld, describe_object, make_object

VALID_SEED = 777_777  # quick checks during training; neither a training nor the evaluation seed


class Logger:
    """Prints progress lines with the time elapsed since the start of training."""

    def __init__(self) -> None:
        self.start = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.start:7.1f}s] {msg}", flush=True)


def world_for(seed: int, stage: int) -> ShapesWorld:
    """The data world of a training stage; distinct from the evaluation world."""
    world_seed = 1000 * seed + stage
    assert world_seed not in (EVAL_SEED, VALID_SEED)
    return ShapesWorld(world_seed)


def optimise(
    name: str,
    params: list,
    stage: Stage,
    loss_fn: Callable[[int], tuple],
    log: Logger,
    every: int,
    probe=None,
    until: float | None = None,
) -> int:
    """AdamW, linear warm-up, cosine decay; ``loss_fn(step)`` gives (loss, answer accuracy).

    ``probe(step)``, if given, is called after every progress line (e.g. a validation check).
    With ``until``, training stops early once the mean accuracy of a progress interval reaches it.
    Returns the number of steps taken.
    """
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=stage.weight_decay)

    def lr_at(step: int) -> float:
        if step < stage.warmup:
            return (step + 1) / stage.warmup
        progress = (step - stage.warmup) / max(1, stage.steps - stage.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses, accs = [], []
    for step in range(stage.steps):
        loss, acc = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append(acc)
        if (step + 1) % every == 0 or step + 1 == stage.steps:
            log(f"{name} step {step + 1}/{stage.steps} loss {np.mean(losses):.4f} answer acc {np.mean(accs):.3f}")
            if probe is not None:
                probe(step + 1)
            if until is not None and np.mean(accs) >= until:
                log(f"{name}: accuracy {np.mean(accs):.3f} >= {until}, stopping after {step + 1} steps")
                return step + 1
            losses, accs = [], []
    return stage.steps


def token_loss(logits: torch.Tensor, b: dict[str, torch.Tensor], text_weight: float) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy on answer words plus ``text_weight`` × that on other targets.

    Separate means keep the answers' weight fixed however long the descriptions and captions
    in a batch are. Returns the loss and the arg-max accuracy on the answer words.
    """
    answers, text = b["kinds"] == ANSWER, b["kinds"] == TEXT
    loss = logits.new_zeros(())
    for keep, weight in ((answers, 1.0), (text, text_weight)):
        if keep.any() and weight:
            loss = loss + weight * F.cross_entropy(logits[keep], b["targets"][keep])
    acc = (logits[answers].argmax(-1) == b["targets"][answers]).float().mean().item() if answers.any() else 0.0
    return loss, acc


def object_phrases() -> list[str]:
    """Every way a description can name one object (colour, shape and left/middle/right)."""
    placed = [make_object(shape, colour, 16, x0, 24) for colour in COLORS for shape in SHAPES for x0 in (2, 24, 46)]
    return [describe_object(o) for o in placed]


def train_clip(recipe: Recipe, seed: int, log: Logger) -> CLIPModel:
    """Stage 1: contrastive CLIP on scenes and their captions (caption pooled at ``</s>``).

    With ``recipe.region_weight``, a region-text term is added, as in RegionCLIP: each object's
    patches (the mean of the layer that LLaVA reads, -2) are contrasted with every phrase a
    description can name an object by ("a red circle on the left"). Whole-scene captions are
    told apart by colours and positions alone, so on its own the contrastive loss hardly
    teaches shape; the region term does, where the language model will look for it.
    Returns the CLIP model; its accuracy is the scene retrieval's, or the region term's.
    """
    torch.manual_seed(seed)
    clip, world, B = CLIPModel(clip_config()), world_for(seed, 1), recipe.clip.batch
    phrases = object_phrases()
    phrase_index = {p: i for i, p in enumerate(phrases)}
    phrase_ids = torch.tensor([list(encode(p)) + [VOCAB.index(EOS)] for p in phrases])  # all the same length

    def embed_text(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return F.normalize(clip.text_projection(hidden[torch.arange(len(ids)), lengths - 1]), dim=-1)

    def loss_fn(step: int):
        scenes = [world.scene(step * B + j) for j in range(B)]
        caps = [list(encode(s.describe())) + [VOCAB.index(EOS)] for s in scenes]
        ids = torch.full((B, max(map(len, caps))), VOCAB.index(PAD))
        for j, c in enumerate(caps):
            ids[j, : len(c)] = torch.tensor(c)
        t = embed_text(ids, torch.tensor([len(c) for c in caps]))
        out = clip.vision_model(pixel_values=pixel_values([s.image for s in scenes]), output_hidden_states=True)
        v = F.normalize(clip.visual_projection(out.pooler_output), dim=-1)
        scale = clip.logit_scale.exp()
        logits, labels = scale * v @ t.T, torch.arange(B)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        if not recipe.region_weight:
            return loss, (logits.argmax(-1) == labels).float().mean().item()
        patches = out.hidden_states[FEATURE_LAYER][:, 1:]
        regions, names = [], []
        for j, s in enumerate(scenes):
            for o, idx in zip(s.objects, world.object_patches(s)):
                regions.append(patches[j, idx].mean(0))
                names.append(phrase_index[describe_object(o, world.image_size)])
        r = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(torch.stack(regions))), dim=-1)
        p = embed_text(phrase_ids, torch.full((len(phrases),), phrase_ids.shape[1]))
        region_logits, names = scale * r @ p.T, torch.tensor(names)
        loss = loss + recipe.region_weight * F.cross_entropy(region_logits, names)
        return loss, (region_logits.argmax(-1) == names).float().mean().item()

    optimise("clip", list(clip.parameters()), recipe.clip, loss_fn, log, recipe.log_every)
    return clip


def qa_batch(world: ShapesWorld, step: int, n: int, visual: bool, recipe: Recipe, offset: int = 0) -> list:
    """Packed QA sequences for items ``step * n ...``; a caption branch with chance ``caption_prob``."""
    seqs = []
    for j in range(n):
        k = step * n + j
        scene, questions = scene_questions(world, k, offset)
        caption = world.rng(k, 200 + offset).random() < recipe.caption_prob
        seqs.append(qa_sequence(scene, questions, visual, caption, describe=recipe.describe_loss))
    return seqs


def train_binding(lm: LlamaForCausalLM, recipe: Recipe, seed: int, log: Logger) -> int:
    """Stage 2a: associative recall, ``<s> red circle blue square green star square`` → ``blue``.

    Recalling the colour of a named shape needs two attention heads that work together (one
    copies each colour onto the next token, one finds the named shape). On full-length prompts
    the model sits on a long plateau before it finds them; on these short sequences it finds
    them in a few hundred steps, and the full prompts are then learned quickly. Stops once the
    recall accuracy reaches ``recipe.bind_until``. Returns the number of steps taken.
    """
    g, B = torch.Generator().manual_seed(seed), recipe.bind.batch
    colours = torch.tensor([VOCAB.index(c) for c in COLORS])
    shapes = torch.tensor([VOCAB.index(s) for s in SHAPES])

    def loss_fn(step: int):
        n = torch.randint(2, 4, (), generator=g).item()
        keys = shapes[torch.stack([torch.randperm(len(SHAPES), generator=g)[:n] for _ in range(B)])]
        values = colours[torch.randint(0, len(COLORS), (B, n), generator=g)]
        asked = torch.randint(0, n, (B,), generator=g)
        rows = torch.arange(B)
        bos = torch.full((B, 1), VOCAB.index(BOS))
        ids = torch.cat([bos, torch.stack([values, keys], -1).reshape(B, 2 * n), keys[rows, asked, None]], 1)
        logits = lm(input_ids=ids).logits[:, -1]
        target = values[rows, asked]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean().item()

    return optimise("bind", list(lm.parameters()), recipe.bind, loss_fn, log, recipe.log_every, until=recipe.bind_until)


def train_lm(recipe: Recipe, seed: int, log: Logger) -> tuple[LlamaForCausalLM, int]:
    """Stage 2: the base LM, first on associative recall, then on scene descriptions and text-only QA.

    Returns the model and the number of recall steps taken.
    """
    torch.manual_seed(seed)
    lm, world = LlamaForCausalLM(text_config()), world_for(seed, 2)
    torch.nn.init.normal_(lm.model.embed_tokens.weight, std=recipe.embed_init)
    bind_steps = train_binding(lm, recipe, seed, log) if recipe.bind.steps else 0

    def loss_fn(step: int):
        b = collate(qa_batch(world, step, recipe.lm.batch, False, recipe))
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        return token_loss(logits, b, recipe.text_weight)

    probe = make_probe(recipe, "lm text", lm, build_processor().tokenizer, False, log)
    optimise("lm", list(lm.parameters()), recipe.lm, loss_fn, log, recipe.log_every, probe)
    return lm, bind_steps


def assemble(clip: CLIPModel, lm: LlamaForCausalLM) -> LlavaForConditionalGeneration:
    """A LLaVA from the CLIP vision tower, a fresh projector and the base LM (all copied)."""
    llava = LlavaForConditionalGeneration(llava_config())
    llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    llava.model.language_model.load_state_dict(lm.model.state_dict())
    llava.lm_head.load_state_dict(lm.lm_head.state_dict())
    return llava


def llava_loss(llava: LlavaForConditionalGeneration, seqs: list, text_weight: float) -> tuple[torch.Tensor, float]:
    b = collate(seqs)
    out = llava(
        input_ids=b["input_ids"],
        pixel_values=b.get("pixel_values"),
        attention_mask=b["attention_mask"],
        position_ids=b["position_ids"],
    )
    return token_loss(out.logits, b, text_weight)


@torch.no_grad()
def calibrate_projector(llava: LlavaForConditionalGeneration, images: list, log: Logger) -> None:
    """Scale the fresh projector's output to the mean norm of the LM's token embeddings.

    At HF's default initialisation, image tokens enter the residual stream about twenty times
    smaller than word embeddings (whose initial std is ``recipe.embed_init``), where the first
    attention layers' outputs swamp them. Rescaling the last linear layer once, on a batch of
    scenes that no stage trains on, puts them at the scale the LM was trained on.
    """
    model, proj = llava.model, llava.model.multi_modal_projector
    features = torch.cat(list(model.get_image_features(pixel_values=pixel_values(images)).pooler_output))
    target = model.language_model.embed_tokens.weight.norm(dim=-1).mean()
    ratio = target / features.norm(dim=-1).mean()
    proj.linear_2.weight.mul_(ratio)
    proj.linear_2.bias.mul_(ratio)
    log(f"projector output scaled by {ratio.item():.1f} to the embeddings' mean norm {target.item():.1f}")


def train_align(llava: LlavaForConditionalGeneration, recipe: Recipe, seed: int, log: Logger) -> None:
    """Stage 3: only the projector learns, on captioning."""
    torch.manual_seed(seed)
    world, B = world_for(seed, 3), recipe.align.batch
    llava.requires_grad_(False)
    llava.model.multi_modal_projector.requires_grad_(True)
    calibrate_projector(llava, [world.scene(10**9 + j).image for j in range(B)], log)
    prefix = visual_prefix()

    def loss_fn(step: int):
        scenes = [world.scene(step * B + j) for j in range(B)]
        seqs = [
            pack(*prefix, [answer_branch(CAPTION_QUESTION, s.describe(), kind=TEXT)], image=s.image) for s in scenes
        ]
        return llava_loss(llava, seqs, 1.0)

    optimise(
        "align", list(llava.model.multi_modal_projector.parameters()), recipe.align, loss_fn, log, recipe.log_every
    )


def train_tune(llava: LlavaForConditionalGeneration, recipe: Recipe, seed: int, log: Logger) -> None:
    """Stage 4: projector and LM on visual QA, with a share of text-only QA."""
    torch.manual_seed(seed)
    world, B = world_for(seed, 4), recipe.tune.batch
    n_text = round(B * recipe.text_share)
    llava.requires_grad_(True)
    llava.model.vision_tower.requires_grad_(False)

    def loss_fn(step: int):
        seqs = qa_batch(world, step, B - n_text, True, recipe)
        seqs += qa_batch(world, step, n_text, False, recipe, offset=3)
        return llava_loss(llava, seqs, recipe.text_weight)

    params = [p for p in llava.parameters() if p.requires_grad]
    probe = make_probe(recipe, "llava visual", llava, build_processor(), True, log)
    optimise("tune", params, recipe.tune, loss_fn, log, recipe.log_every, probe)


def quick_check(name: str, model, processor, visual: bool, n: int, log: Logger) -> dict[str, float]:
    """Accuracy per category on ``n`` validation questions each (not the evaluation seed)."""
    model.eval()
    examples = make_dataset(VALID_SEED, n, CATEGORIES)
    ok = correct(model, processor, examples, visual=visual)
    acc = {c: float(np.mean([o for o, e in zip(ok, examples) if e.category == c])) for c in CATEGORIES}
    log(f"check {name}: " + " ".join(f"{c} {a:.3f}" for c, a in acc.items()) + f" | all {np.mean(ok):.3f}")
    model.train()
    return acc


def make_probe(recipe: Recipe, name: str, model, processor, visual: bool, log: Logger):
    """A validation check every ``recipe.probe_every`` steps, or None."""
    if not recipe.probe_every:
        return None

    def probe(step: int) -> None:
        if step % recipe.probe_every == 0:
            quick_check(f"{name} @{step}", model, processor, visual, recipe.probe_n, log)

    return probe


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
