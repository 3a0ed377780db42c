"""Section 6 solutions — base LM against LLaVA: do the same heads answer text and image questions?"""

# ruff: noqa: F722  (jaxtyping shape strings are not Python expressions)

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

import analyses
from hooked_llava import HookedLlava, LlavaInputs
from hooked_llava.shapes.questions import Example


def question_inputs(model: HookedLlava, example: Example, visual: bool) -> LlavaInputs:
    """The example's visual prompt (image + question), or its text prompt (scene described in words)."""
    if visual:
        return model.prepare(images=[example.image], prompts=[example.prompt])
    return model.prepare(prompts=[example.text_prompt])


def mean_head_scores(model: HookedLlava, examples: Sequence[Example], visual: bool) -> Float[Tensor, "layer head"]:
    """Study A's head scores for the correct answer, averaged over the examples."""
    scores = [
        analyses.log_prob_increase(model, question_inputs(model, ex, visual), unit="head", target=ex.answer)[0]
        for ex in examples
    ]
    return torch.stack(scores).mean(0)


def top_k_overlap(a: Float[Tensor, "layer head"], b: Float[Tensor, "layer head"], k: int) -> int:
    """How many heads are among the top `k` of both score maps."""
    top_a, top_b = set(a.flatten().topk(k).indices.tolist()), set(b.flatten().topk(k).indices.tolist())
    return len(top_a & top_b)


def rank_correlation(a: Float[Tensor, "layer head"], b: Float[Tensor, "layer head"]) -> float:
    """Spearman's rank correlation of two score maps over all heads (ties are broken by order)."""
    ranks = [x.flatten().argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])
