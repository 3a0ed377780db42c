"""The training loop shared by the Shapes LLaVA's stages: optimiser and schedule, the token loss,
QA batches, progress lines and validation checks during training."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hooked_llava.shapes.data import ANSWER, TEXT, qa_sequence, scene_questions
from hooked_llava.shapes.evaluate import EVAL_SEED, correct
from hooked_llava.shapes.questions import CATEGORIES
from hooked_llava.shapes.recipe import Recipe, Stage
from hooked_llava.shapes.world import ShapesWorld, make_dataset

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


def qa_batch(world: ShapesWorld, step: int, n: int, visual: bool, recipe: Recipe, offset: int = 0) -> list:
    """Packed QA sequences for items ``step * n ...``; a caption branch with chance ``caption_prob``."""
    seqs = []
    for j in range(n):
        k = step * n + j
        scene, questions = scene_questions(world, k, offset)
        caption = world.rng(k, 200 + offset).random() < recipe.caption_prob
        seqs.append(qa_sequence(scene, questions, visual, caption, describe=recipe.describe_loss))
    return seqs


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
