"""Questions into prompts, and a clear error for words the tokenizer does not know.

`prepare(questions=...)` formats each question with the model's own chat template (one user
message holding the image(s) and the question), so a checkpoint's answer format, e.g. the
Shapes model's "ASSISTANT: The color of the circle is", is applied for the user. Without a
chat template it falls back to the LLaVA-1.5 prompt.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Any

from torch import Tensor

LLAVA15_TEMPLATE = "USER: <image>\n{question}\nASSISTANT:"  # LLaVA-1.5's prompt, for models without a chat template
TEXT_TEMPLATE = "USER: {question}\nASSISTANT:"  # LLaVA-1.5's prompt without an image, for text-only models
SMALL_VOCAB = 500  # vocabularies up to this size are listed in full in the unknown-word error


def chat_template(processor: Any) -> str | None:
    """The processor's (or its tokenizer's) chat template, or None."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)


def format_questions(
    processor: Any, questions: list[str], n_images: int, template: str | None, image_token: str
) -> tuple[list[str], list[tuple[int, int]]]:
    """Prompts for `questions` and each question's character span inside its prompt.

    Args:
        processor: The model's HF processor or tokenizer (None: only `template` can be used).
        questions: One question per prompt.
        n_images: Images given in all; each question gets one image, or none when 0.
        template: A format string with `{question}` that overrides the chat template.
        image_token: The image placeholder the rendered prompts contain.
    """
    if n_images not in (0, len(questions)):
        raise ValueError(
            f"got {n_images} image(s) for {len(questions)} question(s): give one image per question, or "
            "write the prompts yourself with prompts=[...] to put several images in one prompt."
        )
    chat = chat_template(processor) if template is None else None
    if chat is None:
        template = template or (LLAVA15_TEMPLATE if n_images else TEXT_TEMPLATE)
        if "{question}" not in template:
            raise ValueError(f"template must contain '{{question}}'; got {template!r}.")
        start = template.index("{question}")
        return [template.format(question=q) for q in questions], [(start, start + len(q)) for q in questions]
    tokenizer = getattr(processor, "tokenizer", processor)
    prompts, spans = [], []
    for q in questions:
        content = [{"type": "image"}] * (n_images > 0) + [{"type": "text", "text": q}]
        messages = [{"role": "user", "content": content}]
        prompt = tokenizer.apply_chat_template(messages, chat_template=chat, tokenize=False, add_generation_prompt=True)
        prompts.append(prompt)
        spans.append(_span(prompt, q, image_token))
    return prompts, spans


def _span(prompt: str, question: str, image_token: str) -> tuple[int, int]:
    """Where the question sits in a rendered prompt: its first occurrence after the images."""
    after = prompt.rfind(image_token) + len(image_token) if image_token in prompt else 0
    text = question.strip()
    start = prompt.find(text, after)
    if not text or start < 0:
        raise ValueError(
            f"the chat template rendered {prompt!r}, which does not contain the question {question!r} "
            "verbatim; pass template='...{question}...' (or full prompts=[...]) to format it yourself."
        )
    return start, start + len(text)


def check_known_words(
    tokenizer: Any, prompts: list[str], spans: list[tuple[int, int] | None], input_ids: Tensor, attention_mask: Tensor
) -> None:
    """Raise a ValueError naming the question words that became the tokenizer's unknown token.

    Unknown words outside the question (in a template or system prompt the tokenizer was not
    built for) only warn; where the question's span is not known, the whole prompt counts. A
    tokenizer whose `unknown_words` attribute is "warn" (the tiny random test models') only warns.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not ((input_ids == unk) & attention_mask.bool()).any():
        return
    policy = getattr(tokenizer, "unknown_words", "raise")
    if policy not in ("raise", "warn"):
        raise ValueError(f"tokenizer.unknown_words must be 'raise' or 'warn'; got {policy!r}.")
    asked: list[str] = []
    around: list[str] = []
    for prompt, span in zip(prompts, spans, strict=True):
        enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        for token, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            word = prompt[s:e]
            words = asked if span is None or span[0] <= s < span[1] else around
            if token == unk and word not in words and word != tokenizer.unk_token:
                words.append(word)
    if asked and policy == "raise":
        raise ValueError(unknown_words_message(tokenizer, asked))
    if asked:
        warnings.warn(unknown_words_message(tokenizer, asked), stacklevel=4)
    if around:
        warnings.warn("outside the question, " + unknown_words_message(tokenizer, around), stacklevel=4)


def known_words(tokenizer: Any) -> list[str]:
    """The vocabulary as sorted readable words (BPE/SentencePiece/WordPiece markers stripped, specials left out)."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    pieces = (p for p in tokenizer.get_vocab() if p not in special)
    words = {p.replace("Ġ", " ").replace("▁", " ").removeprefix("##").strip() for p in pieces}
    return sorted(w for w in words if w and w.isprintable())


def near_words(tokenizer: Any, word: str, n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Known words closest to `word`: the same word in another case first, then difflib's matches."""
    words: dict[str, str] = {}
    for known in known_words(tokenizer):
        words.setdefault(known.lower(), known)
    key = word.strip().lower()
    if key in words:
        return [words[key]]
    return [words[c] for c in difflib.get_close_matches(key, list(words), n=n, cutoff=cutoff)]


def unknown_words_message(tokenizer: Any, unknown: list[str]) -> str:
    """What was unknown, close known words, and the known words themselves for a small vocabulary."""
    lines = []
    for word in unknown:
        close = near_words(tokenizer, word)
        hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
        lines.append(f"{word!r}{hint}")
    message = (
        f"the prompt holds word(s) this tokenizer does not know: {', '.join(lines)}; they become its unknown token. "
    )
    known = known_words(tokenizer)
    if len(known) <= SMALL_VOCAB:
        return message + f"Its {len(known)} known words are: {' '.join(known)}"
    return message + f"See model.tokenizer.get_vocab() for its {len(known)} known tokens."
