"""Training batches for the Shapes models: scenes, their questions, and packed token sequences.

To spend compute on answers rather than on re-reading images, one training sequence holds a
shared prefix (``USER: <image>\\n``, or ``USER: {description}\\n`` for text QA) followed by
several independent branches (``{question}\\nASSISTANT: {answer}</s>``). A 4D attention mask
lets each branch see the prefix and itself only, and each branch's positions restart right
after the prefix, so every branch computes exactly what the single-question prompt would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from hooked_llava.shapes.questions import (
    CAPTION_QUESTION,
    CATEGORIES,
    IMAGE_TOKEN,
    TARGETS,
    Question,
    ask,
    colour_question,
)
from hooked_llava.shapes.scene import Scene
from hooked_llava.shapes.tokenizer import BOS, EOS, PAD, VOCAB
from hooked_llava.shapes.world import ShapesWorld

_ID = {w: i for i, w in enumerate(VOCAB)}
_WORD = re.compile(r"\n|[A-Za-z]+|[^\sA-Za-z]")  # the pre-tokenizer's pattern
N_IMAGE_TOKENS = 64
ANSWER, TEXT = 1, 2  # kinds of prediction target: a one-word answer; a description or caption
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@lru_cache(maxsize=1 << 16)
def encode(text: str) -> tuple[int, ...]:
    """Token ids of a text without special tokens, as the Shapes tokenizer splits it (tested)."""
    return tuple(_ID[w] for w in _WORD.findall(text))


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """``[n, 3, H, W]`` CLIP-normalised pixels, as the Shapes ``CLIPImageProcessor`` gives them."""
    x = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    return torch.from_numpy(((x - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2).copy())


@dataclass
class Packed:
    """One training sequence: token ids, positions, segments (-1 prefix, k branch k), loss flags."""

    ids: list[int]
    pos: list[int]
    seg: list[int]
    sup: list[int]  # 0: not a target; ANSWER or TEXT: a target of that kind
    image: Image.Image | None = None


def pack(prefix: list[int], prefix_sup: list[int], branches: list[tuple[list[int], list[int]]], image=None) -> Packed:
    """Lay out a prefix and independent branches whose positions all start after the prefix."""
    p = Packed(list(prefix), list(range(len(prefix))), [-1] * len(prefix), list(prefix_sup), image)
    for k, (ids, sup) in enumerate(branches):
        p.ids += ids
        p.pos += range(len(prefix), len(prefix) + len(ids))
        p.seg += [k] * len(ids)
        p.sup += sup
    return p


def answer_branch(question: str, answer: str, answer_prefix: str = "", kind: int = 1) -> tuple[list[int], list[int]]:
    """``{question}\\nASSISTANT:{answer_prefix} {answer}</s>``, with the loss on answer and ``</s>``."""
    head = encode(f"{question}\nASSISTANT:{answer_prefix}")
    tail = encode(f" {answer}")
    return list(head + tail) + [_ID[EOS]], [0] * len(head) + [kind] * len(tail) + [TEXT]


def visual_prefix() -> tuple[list[int], list[int]]:
    """``<s>USER: <image>\\n`` with the placeholder already expanded to 64 image tokens."""
    ids = [_ID[BOS], *encode("USER:"), *([_ID[IMAGE_TOKEN]] * N_IMAGE_TOKENS), _ID["\n"]]
    return ids, [0] * len(ids)


def text_prefix(description: str, supervise: bool) -> tuple[list[int], list[int]]:
    """``<s>USER: {description}\\n``, optionally with a language-modelling loss on the description."""
    head, body = [_ID[BOS], *encode("USER:")], list(encode(f" {description}\n"))
    return head + body, [0] * len(head) + [TEXT if supervise else 0] * len(body)


def scene_questions(world: ShapesWorld, k: int, offset: int = 0) -> tuple[Scene, list[Question]]:
    """Scene of training item ``k``, one question of every category it supports, and the colour of every object.

    The scene comes from ``world.example`` for category ``k mod 7`` (so answers stay balanced);
    the other categories are asked about the same scene with a random wanted answer.
    """
    ex = world.example(k, CATEGORIES[(k + offset) % len(CATEGORIES)])
    rng = world.rng(k, 100 + offset)
    questions = [Question(ex.question, ex.answer, (), ex.options, ex.answer_prefix)]
    for c in CATEGORIES:
        if c == ex.category:
            continue
        targets = list(TARGETS.get(c, (None,)))
        rng.shuffle(targets)
        q = next((q for t in targets if (q := ask(ex.scene.objects, c, rng, t, world.image_size))), None)
        if q is not None:
            questions.append(q)
    asked = {q.text for q in questions}
    for o in ex.scene.objects:  # the colour of every object: binding words to objects is the hard part
        if (q := colour_question(o)).text not in asked:
            questions.append(q)
    order = rng.permutation(len(questions))
    return ex.scene, [questions[i] for i in order]


def qa_sequence(scene: Scene, questions: list[Question], visual: bool, caption: bool, describe: bool = True) -> Packed:
    """A packed sequence of questions about one scene, seen as an image or as a description.

    ``caption`` adds a "Describe the image." branch; ``describe`` puts a language-modelling loss
    on the description in a text-only prefix.
    """
    branches = [answer_branch(q.text, q.answer, q.answer_prefix) for q in questions]
    if caption:
        branches.append(answer_branch(CAPTION_QUESTION, scene.describe(), kind=TEXT))
    if visual:
        return pack(*visual_prefix(), branches, image=scene.image)
    return pack(*text_prefix(scene.describe(), supervise=describe), branches)


def collate(seqs: list[Packed]) -> dict[str, torch.Tensor]:
    """Pad packed sequences into model inputs and next-token targets.

    Returns:
        ``input_ids``, ``position_ids``, ``targets`` (``-100`` where there is no loss), all
        ``[batch, pos]``; ``kinds`` of those targets (``ANSWER``, ``TEXT``, 0); ``attention_mask``
        ``[batch, 1, pos, pos]`` (True: may attend); and
        ``pixel_values`` ``[n_images, 3, H, W]`` for the sequences that have an image, in order.
    """
    T = max(len(s.ids) for s in seqs)
    n = len(seqs)
    ids = np.full((n, T), _ID[PAD], dtype=np.int64)
    pos = np.zeros((n, T), dtype=np.int64)
    seg = np.full((n, T), -2, dtype=np.int64)  # -2: padding
    sup = np.zeros((n, T), dtype=np.int64)
    for i, s in enumerate(seqs):
        L = len(s.ids)
        ids[i, :L], pos[i, :L], seg[i, :L], sup[i, :L] = s.ids, s.pos, s.seg, s.sup
    causal = np.tril(np.ones((T, T), dtype=bool))
    same = (seg[:, None, :] == -1) | (seg[:, None, :] == seg[:, :, None])  # [n, query, key]
    mask = causal[None] & same
    mask[:, np.arange(T), np.arange(T)] = True  # padding rows attend to themselves
    targets = np.full((n, T), -100, dtype=np.int64)
    follows = (seg[:, 1:] == seg[:, :-1]) & (sup[:, 1:] > 0) & (seg[:, 1:] != -2)
    targets[:, :-1] = np.where(follows, ids[:, 1:], -100)
    kinds = np.zeros((n, T), dtype=np.int64)
    kinds[:, :-1] = np.where(follows, sup[:, 1:], 0)
    out = {
        "input_ids": torch.from_numpy(ids),
        "position_ids": torch.from_numpy(pos),
        "attention_mask": torch.from_numpy(mask[:, None]),
        "targets": torch.from_numpy(targets),
        "kinds": torch.from_numpy(kinds),
    }
    images = [s.image for s in seqs if s.image is not None]
    if images:
        out["pixel_values"] = pixel_values(images)
    return out
