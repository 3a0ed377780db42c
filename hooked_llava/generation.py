"""Greedy decoding and sampling with a KV cache, returning prompt + new tokens as HF does."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor

from .locking import locked


def _room(n_prompt: int, n_ctx: int, max_new_tokens: int) -> int:
    """New tokens that fit in the context: capped at `n_ctx - n_prompt` with a warning, as the model
    has no positions beyond its context length (HF would warn and run past it)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}.")
    room = n_ctx - n_prompt
    if max_new_tokens > 0 and room <= 0:
        raise ValueError(
            f"the prompt ({n_prompt} tokens) already fills the model's context length of {n_ctx}: no token "
            "can be generated. Shorten the prompt."
        )
    if max_new_tokens > room:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} would run past the model's context length of {n_ctx} "
            f"(the prompt has {n_prompt} tokens): generating at most {room} new tokens.",
            stacklevel=2,
        )
    return min(max_new_tokens, room)


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: Any) -> Tensor:
    logits = logits.float() / max(temperature, 1e-8)
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


class GenerationMixin:
    """`generate` for HookedLlava; hooks fire on every decoding step."""

    cfg: Any

    @locked
    @torch.no_grad()
    def generate(
        self,
        input: Any,
        max_new_tokens: int = 20,
        *,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_sizes: Any = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = -1,
        seed: int | None = None,
    ) -> Int[Tensor, "batch pos"]:
        """Decode up to `max_new_tokens`; finished rows are filled with the pad token. Decoding stops at
        the context length `cfg.n_ctx` (the output never exceeds it), with a warning when that cuts it short.

        Args:
            input: `LlavaInputs`, token ids or text, as for `forward`.
            eos_token_id: stop token(s); the default -1 means the config's, None never stops.
            seed: seeds the sampler (only used with `do_sample`).

        Returns:
            `[batch, prompt + new]` token ids: the prompt followed by the generated tokens.
        """
        inputs = self.as_inputs(input, pixel_values, attention_mask, image_sizes)  # type: ignore[attr-defined]
        max_new_tokens = _room(inputs.input_ids.shape[1], self.cfg.n_ctx, max_new_tokens)
        eos = self.cfg.eos_token_id if eos_token_id == -1 else eos_token_id
        eos_ids = torch.as_tensor([] if eos is None else eos, device=inputs.input_ids.device).reshape(-1)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        gen = torch.Generator(device=inputs.input_ids.device).manual_seed(seed) if seed is not None else None
        mask, positions = inputs.attention_mask, inputs.position_ids()
        x = self.embed_inputs(inputs)  # type: ignore[attr-defined]
        tokens, done, past = inputs.input_ids, torch.zeros(len(inputs), dtype=torch.bool, device=mask.device), None
        for _ in range(max_new_tokens):
            x, past_new = self.run_blocks(x, mask, positions, past=past)  # type: ignore[attr-defined]
            past = past_new
            logits = self.unembed(self.ln_final(x[:, -1:]))[:, 0]  # type: ignore[attr-defined]
            nxt = _sample(logits, temperature, top_k, top_p, gen) if do_sample else logits.argmax(-1)
            nxt = torch.where(done, pad, nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = done | torch.isin(nxt, eos_ids)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            x = self.hook_embed(F.embedding(nxt[:, None], self.w_e))  # type: ignore[attr-defined]
        return tokens
