"""`generate` as TransformerLens': sampling (or greedy) decoding with a KV cache, returning the
prompt and the new tokens, as text for text input."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from hooked_llava.inputs.llava_inputs import LlavaInputs
from hooked_llava.loading import devices
from hooked_llava.model.kv_cache import KeyValueCache
from hooked_llava.surface.locking import locked


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


def _sample(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    freq_penalty: float,
    tokens: Tensor,
    gen: Any,
    mask: Tensor | None = None,
) -> Tensor:
    """TransformerLens' `sample_logits`: temperature 0 is greedy; the frequency penalty subtracts
    `freq_penalty` times each token's count so far (prompt included, padding not) after the temperature."""
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if freq_penalty > 0:
        real = torch.ones_like(tokens, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
        counts = torch.zeros_like(logits).scatter_add_(1, tokens, real)  # [batch, d_vocab], any prompt length
        logits = logits - freq_penalty * counts
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=gen)[:, 0]


def _check_sampling(max_new_tokens: Any, top_k: Any, top_p: Any, temperature: Any, freq_penalty: Any) -> None:
    """Refuse what HF's `generate` refuses, naming the argument and its valid range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an integer 0 or more, got {max_new_tokens!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer (or None for no top-k filtering), got {top_k!r}.")
    checks = (
        ("top_p", top_p, 1.0, "a number in 0..1 (or None)"),
        ("temperature", temperature, math.inf, "a finite number 0 or more (0 is greedy)"),
        ("freq_penalty", freq_penalty, math.inf, "a finite number 0 or more"),
    )
    for name, value, high, valid in checks:
        if value is None and name == "top_p":
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and 0.0 <= value <= high):
            raise ValueError(f"{name} must be {valid}, got {value!r}.")


class GenerationMixin:
    """`generate` for HookedLlava; hooks fire on every decoding step."""

    cfg: Any

    @locked
    @torch.no_grad()
    def generate(
        self,
        input: Any = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        return_type: str = "input",  # "input", "str" or "tokens", checked below
        verbose: bool = True,
        *,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_sizes: Any = None,
        seed: int | None = None,
    ) -> str | list[str] | Tensor:
        """Sample (or with `do_sample=False`, greedily pick) up to `max_new_tokens`, as TransformerLens.
        Decoding stops at the context length `cfg.n_ctx` (the output never exceeds it), with a warning
        when that cuts it short.

        Args:
            input: text, a list of texts (padded on the left), token ids or a `LlavaInputs`, as for `forward`.
            stop_at_eos: stop a row at `eos_token_id` (None: the config's, else the tokenizer's EOS).
                Finished rows are filled with the pad token (TransformerLens fills them with EOS).
            do_sample: sample (TransformerLens' default) with `temperature` (0 is greedy), `top_k`,
                `top_p` and `freq_penalty`; False decodes greedily.
            use_past_kv_cache: False recomputes the whole sequence, image included, at every step.
            prepend_bos, padding_side: how text input is tokenised (see `to_tokens`); batches of texts
                must be padded on the left, so that every row ends with its last real token.
            return_type: "input" (text for text input, else tokens), "str" or "tokens".
            verbose: show a progress bar.
            seed: seeds the sampler.

        Returns:
            The prompt followed by the new tokens: `[batch, prompt + new]` token ids, or decoded text
            without special tokens (one string for a string or a one-row batch, else a list).
        """
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}.")
        _check_sampling(max_new_tokens, top_k, top_p, temperature, freq_penalty)
        text_in = isinstance(input, str) or (isinstance(input, list) and bool(input) and isinstance(input[0], str))
        inputs = self._generation_inputs(input, pixel_values, attention_mask, image_sizes, prepend_bos, padding_side)
        max_new_tokens = _room(inputs.input_ids.shape[1], self.cfg.n_ctx, max_new_tokens)
        eos_ids = self._stop_tokens(stop_at_eos, eos_token_id).to(inputs.input_ids.device)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
        gen = torch.Generator(device=inputs.input_ids.device).manual_seed(seed) if seed is not None else None
        mask, positions = inputs.attention_mask, inputs.position_ids()
        x = self.embed_inputs(inputs) if use_past_kv_cache else None  # type: ignore[attr-defined]
        tokens, done = inputs.input_ids, torch.zeros(len(inputs), dtype=torch.bool, device=mask.device)
        layer_devices = devices.block_devices(self, mask.device)  # a placed model: each layer's own device
        past = KeyValueCache.init_cache(self.cfg, layer_devices, len(inputs)) if use_past_kv_cache else None
        for _ in tqdm(range(max_new_tokens), disable=not verbose):
            if use_past_kv_cache:  # the cache's entries grow in place
                x = self.run_blocks(x, mask, positions, past_kv_cache=past)  # type: ignore[attr-defined]
            else:
                seq = LlavaInputs(input_ids=tokens, attention_mask=mask)  # positions of the whole sequence
                x = self.run_blocks(self._embed_all(inputs, tokens), mask, seq.position_ids())  # type: ignore[attr-defined]
            logits = self.unembed(self.ln_final(x[:, -1:]))[:, 0].to(tokens.device)  # type: ignore[attr-defined]
            nxt = (
                _sample(logits, temperature, top_k, top_p, freq_penalty, tokens, gen, mask)
                if do_sample
                else logits.argmax(-1)
            )
            nxt = torch.where(done, pad, nxt)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done = done | torch.isin(nxt, eos_ids)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            x = self.hook_embed(self.embed(nxt[:, None])) if use_past_kv_cache else None  # type: ignore[attr-defined]
        as_text = return_type == "str" or (return_type == "input" and text_in)
        return self._generated(tokens, input) if as_text else tokens

    def _generation_inputs(
        self, input: Any, pixel_values: Any, attention_mask: Any, image_sizes: Any, prepend_bos: Any, padding_side: Any
    ) -> LlavaInputs:
        if isinstance(input, list) and len(input) > 1 and isinstance(input[0], str):
            if padding_side == "right":
                raise ValueError("generate pads a batch of texts on the left, so each row ends at its last real token.")
            padding_side = "left"
        inputs = self.as_inputs(  # type: ignore[attr-defined]
            input, pixel_values, attention_mask, image_sizes, prepend_bos=prepend_bos, padding_side=padding_side
        )
        if not bool(inputs.attention_mask[:, -1].all()):
            raise ValueError(
                "generate continues each row after its last position, so padding must be on the left: "
                "prepare the inputs with padding_side='left' (the default of `model.prepare`)."
            )
        return inputs

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id: int | list[int] | None) -> Tensor:
        """The ids that finish a row: none unless `stop_at_eos`; by default the config's EOS, else the tokenizer's."""
        if not stop_at_eos:
            return torch.zeros(0, dtype=torch.long)
        if eos_token_id is None:
            eos_token_id = self.cfg.eos_token_id
        if eos_token_id is None and getattr(self, "processor", None) is not None:
            eos_token_id = self.tokenizer.eos_token_id  # type: ignore[attr-defined]
        if eos_token_id is None:
            raise ValueError("this model has no EOS token to stop at: pass eos_token_id= or stop_at_eos=False.")
        return torch.as_tensor(eos_token_id, dtype=torch.long).reshape(-1)

    def _embed_all(self, inputs: LlavaInputs, tokens: Tensor) -> Tensor:
        """The prompt embedded with its images, then the new tokens, each through `hook_embed` as
        in the cached path (so a generated `<image>` id stays an ordinary token)."""
        prompt = self.embed_inputs(inputs)  # type: ignore[attr-defined]
        new = tokens[:, inputs.input_ids.shape[1] :]
        if not new.shape[1]:
            return prompt
        return torch.cat([prompt, self.hook_embed(self.embed(new))], dim=1)  # type: ignore[attr-defined]

    def _generated(self, tokens: Tensor, input: Any) -> str | list[str]:
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]  # type: ignore[attr-defined]
        return texts[0] if len(texts) == 1 and not isinstance(input, list) else texts
