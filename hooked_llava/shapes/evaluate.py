"""Accuracy of the Shapes models on fresh held-out questions, per category.

Three settings, as in study A's comparison across models: the LLaVA on visual QA, the LLaVA on
text-only QA (the scene described in words), and the base language model on text-only QA.
Every answer is one token, so a prediction is the arg-max of the next-token logits after the
prompt. Only HF classes and the saved processor are used, so the numbers describe exactly
what ``from_pretrained`` loads.

Run ``python -m hooked_llava.shapes.evaluate`` to print the table for the shipped checkpoints.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from hooked_llava.shapes.questions import CATEGORIES, Example
from hooked_llava.shapes.world import make_dataset

EVAL_SEED = 12345  # never used for training (training worlds use seeds 1000 * seed + stage)
SETTINGS: tuple[str, ...] = ("llava_visual", "llava_text", "lm_text")


@torch.no_grad()
def answer_scores(model: Any, examples: Sequence[Any], batch: int = 64) -> dict[str, float]:
    """Answer accuracy (%), answer cross-entropy and mean next-token loss of the model as it is now."""
    tok = model.processor.tokenizer
    correct, answer_ce, lm_loss = [], [], []
    for i in range(0, len(examples), batch):
        chunk = examples[i : i + batch]
        inputs = model.prepare(images=[e.image for e in chunk], prompts=[e.prompt for e in chunk])
        logits, loss = model(inputs, return_type="both")
        last = logits[torch.arange(len(chunk)), inputs.last]
        answers = torch.tensor(tok.convert_tokens_to_ids([e.answer for e in chunk]), device=last.device)
        correct.append(last.argmax(-1) == answers)
        answer_ce.append(F.cross_entropy(last.float(), answers, reduction="none"))
        lm_loss.append(loss.reshape(1))
    return {
        "accuracy": 100 * float(torch.cat(correct).float().mean()),
        "answer_ce": float(torch.cat(answer_ce).mean()),
        "next_token_loss": float(torch.stack(lm_loss).mean()),
    }


@torch.no_grad()
def predict(
    model, processor, prompts: Sequence[str], images: Sequence | None = None, batch_size: int = 128
) -> list[str]:
    """The arg-max next token after each prompt, as a string.

    Args:
        model: An HF ``LlavaForConditionalGeneration`` or ``LlamaForCausalLM``.
        processor: The ``LlavaProcessor`` (needed with images) or the tokenizer.
        prompts: Prompts in the LLaVA-1.5 format.
        images: One image per prompt for visual QA, or None for text-only prompts.
        batch_size: Prompts per forward pass.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        text = list(prompts[start : start + batch_size])
        kwargs = {"padding": True, "padding_side": "right", "return_tensors": "pt"}
        if images is not None:
            enc = processor(images=list(images[start : start + batch_size]), text=text, **kwargs)
        else:
            enc = tokenizer(text, **kwargs)
        enc = enc.to(model.device)
        logits = model(**enc).logits  # [batch, pos, vocab]; right padding keeps positions exact
        last = enc["attention_mask"].sum(1) - 1
        ids = logits[torch.arange(len(text)), last].argmax(-1)
        out += tokenizer.convert_ids_to_tokens(ids.tolist())
    return out


def hits(predicted: Sequence[str], examples: Sequence[Example]) -> list[bool]:
    """Whether each predicted next token (as the tokenizer spells it) is the example's one-word answer."""
    if len(predicted) != len(examples):
        raise ValueError(f"got {len(predicted)} predictions for {len(examples)} examples.")
    return [p == e.answer for p, e in zip(predicted, examples)]


def correct(model, processor, examples: Sequence[Example], visual: bool, batch_size: int = 128) -> list[bool]:
    """Whether the model's next token is the answer, for each example."""
    prompts = [e.prompt if visual else e.text_prompt for e in examples]
    images = [e.image for e in examples] if visual else None
    return hits(predict(model, processor, prompts, images, batch_size), examples)


def accuracy_table(llava, lm, processor, examples: Sequence[Example]) -> pd.DataFrame:
    """Accuracy (%) per category and overall, in each of the three settings.

    Returns:
        A DataFrame indexed by category (plus ``"overall"``), with columns ``SETTINGS`` and ``n``.
    """
    rows = {
        "llava_visual": correct(llava, processor, examples, visual=True),
        "llava_text": correct(llava, processor, examples, visual=False),
        "lm_text": correct(lm, processor.tokenizer, examples, visual=False),
    }
    frame = pd.DataFrame(rows).assign(category=[e.category for e in examples])
    table = frame.groupby("category", sort=False).mean() * 100
    table.loc["overall"] = frame[list(SETTINGS)].mean() * 100
    table["n"] = frame.groupby("category", sort=False).size().reindex(table.index).fillna(len(frame)).astype(int)
    return table


def load(llava_dir: str | Path, lm_dir: str | Path):
    """Load the two checkpoints and the processor with HF's ``from_pretrained``."""
    from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    lm = LlamaForCausalLM.from_pretrained(lm_dir).eval()
    return llava, lm, AutoProcessor.from_pretrained(llava_dir)


def evaluate_checkpoints(llava_dir, lm_dir, seed: int = EVAL_SEED, n_per_category: int = 500) -> pd.DataFrame:
    """The accuracy table of saved checkpoints on ``n_per_category`` fresh questions per category."""
    llava, lm, processor = load(llava_dir, lm_dir)
    return accuracy_table(llava, lm, processor, make_dataset(seed, n_per_category, CATEGORIES))


def format_table(table: pd.DataFrame) -> str:
    """The table in Markdown, as published in the model cards."""
    head = "| category | n | LLaVA, visual QA | LLaVA, text QA | base LM, text QA |\n|---|---|---|---|---|\n"
    lines = [
        f"| {c} | {int(r['n'])} | {r['llava_visual']:.1f} | {r['llava_text']:.1f} | {r['lm_text']:.1f} |"
        for c, r in table.iterrows()
    ]
    return head + "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    from hooked_llava.shapes import checkpoint_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llava", default=str(checkpoint_path("shapes-llava")), help="LLaVA checkpoint directory")
    parser.add_argument("--lm", default=str(checkpoint_path("shapes-lm")), help="base LM checkpoint directory")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="held-out world seed")
    parser.add_argument("--n", type=int, default=500, help="questions per category")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    table = evaluate_checkpoints(args.llava, args.lm, args.seed, args.n)
    print(format_table(table), flush=True)
    print(f"seed {args.seed}, {args.n} questions per category, {time.time() - start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "table": table.to_dict(orient="index")}, indent=1))
    return table


if __name__ == "__main__":
    main()
