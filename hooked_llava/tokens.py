"""Tokenizer-facing methods of the TransformerLens surface (`to_tokens`, `to_string`, ...)."""

from __future__ import annotations

import difflib
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


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
        self, input: str | list[str], prepend_bos: bool = True, padding_side: str = "right"
    ) -> Int[Tensor, "batch pos"]:
        """Tokenise text; each `<image>` is expanded to the image's number of placeholder tokens."""
        texts = [input] if isinstance(input, str) else list(input)
        image_token = getattr(self.processor, "image_token", "<image>")
        if self.vision is not None and self.cfgs.pinpoints is None:  # NeXT counts vary by image
            texts = [t.replace(image_token, image_token * self.vision.cfg.n_image_tokens) for t in texts]
        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, padding_side
        try:
            ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=prepend_bos)["input_ids"]
        finally:
            tok.padding_side = side
        return ids

    def to_string(self, tokens: Tensor | list[int] | int) -> str | list[str]:
        """Decode token ids; a `[batch, pos]` tensor gives one string per row."""
        t = torch.as_tensor(tokens)
        if t.ndim == 2:
            return [self.tokenizer.decode(row) for row in t.tolist()]
        return self.tokenizer.decode(t.reshape(-1).tolist())

    def to_str_tokens(self, tokens: Tensor | str) -> list[str]:
        ids = self.to_tokens(tokens)[0] if isinstance(tokens, str) else torch.as_tensor(tokens).reshape(-1)
        return self.tokenizer.convert_ids_to_tokens(ids.tolist())

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
                f"{string!r} is not in the vocabulary (the tokenizer maps it to {tok.unk_token!r}).{self._near(string)}"
            )
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens ({ids}), not one.")
        return int(ids[0])

    def _near(self, word: str, n: int = 5) -> str:
        """A hint naming the vocabulary's closest words to `word` (case-insensitive), or where to look."""
        words: dict[str, str] = {}
        for piece in self.tokenizer.get_vocab():
            text = piece.replace("Ġ", " ").replace("▁", " ").removeprefix("##").strip()
            if text.isprintable() and text:
                words.setdefault(text.lower(), text)
        close = difflib.get_close_matches(word.strip().lower(), list(words), n=n, cutoff=0.5)
        if close:
            return f" Did you mean: {', '.join(repr(words[c]) for c in close)}?"
        if len(words) <= 100:
            return f" The vocabulary's words: {', '.join(sorted(words.values()))}."
        return " See `model.tokenizer.get_vocab()` for the known tokens."

    def tokens_to_residual_directions(self, tokens: Any) -> Float[Tensor, "... d_model"]:
        """Unembedding directions of tokens (an id, a string of one token, or a tensor of ids)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens)
        directions = self.W_U[:, ids.reshape(-1)].T  # type: ignore[attr-defined]
        return directions.reshape(*ids.shape, -1) if ids.ndim else directions[0]
