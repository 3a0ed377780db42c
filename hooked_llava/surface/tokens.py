"""Tokenizer-facing methods of the TransformerLens surface (`to_tokens`, `to_str_tokens`, ...).

TransformerLens defaults apply: text gets a BOS token unless `prepend_bos=False`, batches are
padded on the right unless `padding_side="left"`, and a tokenizer without a pad token pads
with its EOS (or BOS) id, as TransformerLens does, without modifying the tokenizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from hooked_llava.inputs.llava_inputs import LlavaInputs
from hooked_llava.inputs.prompts import SMALL_VOCAB, known_words, near_words
from hooked_llava.model.next import HIGHRES, NEWLINE

StrTokens = list[str] | list[list[str]]


class TokensMixin:
    """Needs `self.processor` (an HF processor or tokenizer), `self.cfg` and `self.W_U`."""

    processor: Any
    cfg: Any
    cfgs: Any
    vision: Any

    @property
    def tokenizer(self) -> Any:
        if self.processor is None:
            raise ValueError("this model has no tokenizer: pass `processor=` when loading it.")
        return getattr(self.processor, "tokenizer", self.processor)

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise text as TransformerLens does; each `<image>` is expanded to the image's number
        of placeholder tokens.

        Args:
            prepend_bos: put the BOS token first (None: `cfg.default_prepend_bos`, True by default).
                Pass False when tokenising part of a prompt, e.g. an answer.
            padding_side: "right" (default, as TransformerLens) or "left", for batches of texts.
            move_to_device: put the tokens on `cfg.device` (False: leave them on the CPU).
            truncate: keep at most `cfg.n_ctx` tokens of each text (its end is cut), as TransformerLens does.
        """
        tokens = self.tokenize(input, prepend_bos, padding_side, truncate=truncate)[0]
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def tokenize(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        truncate: bool = False,
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """`to_tokens` with the attention mask that marks real tokens (1) and padding (0)."""
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens takes a string or a non-empty list of strings.")
        side = padding_side or "right"
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        image_token = getattr(self.processor, "image_token", "<image>")
        if self.vision is not None and self.cfgs.pinpoints is None:  # NeXT counts vary by image
            texts = [t.replace(image_token, image_token * self.vision.cfg.n_image_tokens) for t in texts]
        tok = self.tokenizer
        rows = tok(texts, add_special_tokens=False)["input_ids"]
        bos = getattr(self.cfg, "default_prepend_bos", True) if prepend_bos is None else prepend_bos
        if bos and tok.bos_token_id is not None:  # tokenizers without BOS (e.g. Qwen2) get none, as in TL
            rows = [[tok.bos_token_id, *row] for row in rows]
        if truncate:
            image_id = tok.get_vocab().get(image_token) if self.vision is not None else None
            rows = [self._truncated(row, image_id) for row in rows]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            cols = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, cols], mask[i, cols] = torch.tensor(row, dtype=torch.long), 1
        return ids, mask

    def _truncated(self, row: list[int], image_id: int | None) -> list[int]:
        """The first `cfg.n_ctx` ids of `row`; an error if that would cut image placeholders, which
        would leave an image with fewer positions than it has patches."""
        n_ctx = self.cfg.n_ctx
        if len(row) > n_ctx and image_id is not None and image_id in row[n_ctx:]:
            raise ValueError(
                f"truncating this text to n_ctx = {n_ctx} tokens would cut an image's placeholder tokens "
                f"(the text has {len(row)} tokens with its images expanded). Shorten the text, use fewer "
                "images, or pass truncate=False."
            )
        return row[:n_ctx]

    @property
    def pad_token_id(self) -> int:
        """The tokenizer's pad id, else its EOS, else its BOS (TransformerLens' fallback), else 0."""
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def to_string(self, tokens: Tensor | np.ndarray | list[int] | int) -> str | list[str]:
        """Decode token ids; a `[batch, pos]` tensor gives one string per row."""
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [self.tokenizer.decode(row, clean_up_tokenization_spaces=False) for row in t.tolist()]
        return self.tokenizer.decode(t.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(
        self,
        input: str | list | Tensor | np.ndarray | LlavaInputs,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> StrTokens:
        """Each token as a string, decoded one by one as TransformerLens does.

        A string or a `[pos]` / `[1, pos]` tensor gives a list; a list of strings, or a `[batch, pos]`
        tensor or `LlavaInputs` with batch > 1, gives one list per row. In a `LlavaInputs`, image
        positions read `<img row,col>` (their cell in the patch grid), `<img cls>` for CLS; for
        LLaVA-NeXT `<img row,col>` is the base view's cell, `<img hi row,col>` the high-res grid's
        and `<img newline>` a row separator. `prepend_bos` and `padding_side` only apply to text.
        """
        if isinstance(input, LlavaInputs):
            rows = [self._decode_each(ids, labels) for ids, labels in zip(input.input_ids, _image_labels(input))]
            return rows[0] if len(rows) == 1 else rows
        if isinstance(input, str):
            return self._decode_each(self.to_tokens(input, prepend_bos, padding_side)[0])
        if isinstance(input, list) and not all(isinstance(t, int) for t in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]  # type: ignore[return-value]
        if not isinstance(input, (Tensor, np.ndarray, list)):
            raise TypeError(f"to_str_tokens takes text, token ids or LlavaInputs, not {type(input).__name__}.")
        ids = torch.as_tensor(input)
        if ids.ndim == 2 and ids.shape[0] > 1:
            return [self._decode_each(row) for row in ids]
        if ids.ndim > 2 or (ids.ndim == 2 and ids.shape[0] == 0):
            raise ValueError(f"to_str_tokens takes token ids [pos] or [batch, pos], got shape {tuple(ids.shape)}.")
        return self._decode_each(ids.reshape(-1))

    def _decode_each(self, ids: Tensor, labels: list[str | None] | None = None) -> list[str]:
        decoded = self.tokenizer.batch_decode([[int(i)] for i in ids.tolist()], clean_up_tokenization_spaces=False)
        return decoded if labels is None else [label or text for label, text in zip(labels, decoded, strict=True)]

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS).

        A string the tokenizer would map to its unknown token (`<unk>`) raises a ValueError that
        names it and suggests the closest words of the vocabulary, rather than explaining `<unk>`.
        """
        tok = self.tokenizer
        ids = tok(string, add_special_tokens=False)["input_ids"]
        unk = getattr(tok, "unk_token_id", None)
        if unk is not None and unk in ids and string.strip() != tok.unk_token:
            raise ValueError(
                f"{string!r} is not in the vocabulary (the tokenizer maps it to {tok.unk_token!r}).{_hint(tok, string)}"
            )
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens ({ids}), not one.")
        return int(ids[0])

    def to_single_str_token(self, int_token: int | Tensor) -> str:
        """The string of one token id (the inverse of `to_single_token`)."""
        if isinstance(int_token, Tensor) and int_token.numel() == 1 and not int_token.is_floating_point():
            int_token = int(int_token.item())
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one token id (an int), not {int_token!r}.")
        return self._decode_each(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: str | int | Tensor,
        input: str | Tensor | LlavaInputs,
        mode: str = "first",
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
    ) -> int:
        """Position of `single_token` (a one-token string or an id) in text, `[pos]` or `[1, pos]` ids,
        or a one-row `LlavaInputs`; `mode` picks the "first" or "last" occurrence."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}.")
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side)
        else:
            ids = input.input_ids if isinstance(input, LlavaInputs) else torch.as_tensor(input)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ValueError(f"get_token_position searches one sequence: [pos] or [1, pos], got {tuple(ids.shape)}.")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        found = (ids == token).nonzero()[:, 0]
        if not len(found):
            raise ValueError(f"token {token} ({self.to_single_str_token(token)!r}) does not occur in the input.")
        return int(found[0] if mode == "first" else found[-1])

    def tokens_to_residual_directions(self, tokens: Any) -> Float[Tensor, "... d_model"]:
        """Unembedding directions of tokens (an id, a string of one token, or a tensor of ids). As in
        TransformerLens, a tensor holding one id gives one `[d_model]` direction."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens)
        directions = self.W_U[:, ids.reshape(-1)].T  # type: ignore[attr-defined]
        return directions.reshape(*ids.shape, -1) if ids.numel() > 1 else directions[0]


def _image_labels(inputs: LlavaInputs) -> list[list[str | None]]:
    """Per row and position, a readable label for image positions (None elsewhere)."""
    mask, rc = inputs.image_mask.tolist(), inputs.patch_rc().tolist()
    kinds = iter(t[0] for table in inputs.token_tables or [] for t in table)
    labels: list[list[str | None]] = []
    for mask_row, rc_row in zip(mask, rc, strict=True):
        row: list[str | None] = []
        for is_image, (r, c) in zip(mask_row, rc_row, strict=True):
            kind = next(kinds, None) if is_image else None
            if not is_image:
                row.append(None)
            elif kind == NEWLINE:
                row.append("<img newline>")
            else:
                row.append("<img cls>" if r < 0 else f"<img {'hi ' if kind == HIGHRES else ''}{r},{c}>")
        labels.append(row)
    return labels


def _hint(tokenizer: Any, word: str) -> str:
    """Close known words, or the whole (small) vocabulary, or where to look."""
    close = near_words(tokenizer, word, n=5, cutoff=0.5)
    if close:
        return f" Did you mean: {', '.join(map(repr, close))}?"
    words = known_words(tokenizer)
    if len(words) <= SMALL_VOCAB:
        return f" The vocabulary's words: {', '.join(words)}."
    return " See `model.tokenizer.get_vocab()` for the known tokens."
