"""Where a forward pass starts and what it is scored against: `input_to_embed`, the inputs of
`start_at_layer`, and TransformerLens' next-token `loss_fn`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hooked_llava.inputs.llava_inputs import LlavaInputs


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], keep: Tensor | None, per_token: bool
) -> Tensor:
    """TransformerLens' `lm_cross_entropy_loss`: per token `[batch, pos-1]` (0 where not kept),
    or the mean over kept predictions."""
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    if keep is not None:
        losses = losses.masked_fill(~keep.to(losses.device), 0.0)
    if per_token:
        return losses
    n = losses.numel() if keep is None else int(keep.sum())
    if n == 0:
        raise ValueError("no next-token prediction is left to score: every target is padding or an image position.")
    return losses.sum() / n


class EntryMixin:
    """Needs `as_inputs`, `prepare` and `embed_inputs` (see `HookedLlava`)."""

    cfg: Any

    def loss_fn(
        self,
        logits: Float[Tensor, "batch pos d_vocab"],
        tokens: Int[Tensor, "batch pos"] | LlavaInputs,
        attention_mask: Tensor | None = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross-entropy, as TransformerLens' `loss_fn`.

        A prediction counts when both its position and the next are real (attention mask 1). When
        `tokens` is a `LlavaInputs`, predictions *of* image placeholders are also left out (as Hugging
        Face LLaVA training labels them -100); predictions made *at* image positions of the text that
        follows still count. With `per_token` the result is `[batch, pos-1]` with 0 at the left-out
        predictions; otherwise the mean over the counted ones.
        """
        mask: Tensor | None
        if isinstance(tokens, LlavaInputs):
            mask = tokens.attention_mask if attention_mask is None else attention_mask
            ids, image = tokens.input_ids, tokens.image_mask
        else:
            ids, mask, image = tokens, attention_mask, None
        if ids.shape != logits.shape[:2]:
            raise ValueError(
                f"tokens {tuple(ids.shape)} do not match the logits' [batch, pos] {tuple(logits.shape[:2])}."
            )
        if mask is None:
            return next_token_loss(logits, ids, None, per_token)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must have the shape of tokens {tuple(ids.shape)}.")
        keep = mask[:, :-1].bool() & mask[:, 1:].bool()
        if image is not None:
            keep &= ~image[:, 1:]
        return next_token_loss(logits, ids, keep, per_token)

    def input_to_embed(
        self,
        input: str | list[str] | Tensor | LlavaInputs,
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        attention_mask: Tensor | None = None,
        *,
        pixel_values: Any = None,
        image_sizes: Any = None,
    ) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, "batch pos"], None, Int[Tensor, "batch pos"]]:
        """TransformerLens' `(residual, tokens, shortformer_pos_embed, attention_mask)`.

        `residual` is `hook_embed`'s output (image features merged in), the `resid_pre` of block 0.
        `shortformer_pos_embed` is always None: LLaVA's positions are rotary, applied inside
        attention from the attention mask, so nothing positional is added to the residual.
        `attention_mask` is always a tensor (1 = real token). Resume with
        `model(residual, start_at_layer=0, tokens=tokens, attention_mask=attention_mask)`.
        """
        inputs = self.as_inputs(  # type: ignore[attr-defined]
            input, pixel_values, attention_mask, image_sizes, prepend_bos=prepend_bos, padding_side=padding_side
        )
        return self.embed_inputs(inputs), inputs.input_ids, None, inputs.attention_mask  # type: ignore[attr-defined]

    def resume_at_layer(
        self, input: Any, residual: Tensor | None, tokens: Any, **kw: Any
    ) -> tuple[Tensor, LlavaInputs, bool]:
        """`forward(..., start_at_layer=k)`'s entry: the residual entering block k, the inputs that give
        its mask and positions, and whether those inputs hold real tokens (a residual given alone has
        none to score)."""
        if residual is not None:  # model(inputs, start_at_layer=k, residual=x)
            if tokens is not None:
                raise ValueError("give the tokens either as the first argument or as tokens=, not both.")
            inputs = self.as_inputs(input, **kw)  # type: ignore[attr-defined]
            return self._checked(residual, inputs), inputs, True
        if not (isinstance(input, Tensor) and input.is_floating_point() and input.ndim == 3):
            raise ValueError(
                "start_at_layer needs the residual stream [batch, pos, d_model] entering that block: pass it as "
                "the first argument (TransformerLens' model(resid, start_at_layer=k)) or as residual=."
            )
        return self._residual_entry(input, tokens, kw)

    def _residual_entry(self, residual: Tensor, tokens: Any, kw: dict[str, Any]) -> tuple[Tensor, LlavaInputs, bool]:
        if kw.get("pixel_values") is not None or kw.get("image_sizes") is not None:
            raise ValueError("the residual already holds the image features: drop pixel_values/image_sizes.")
        mask = kw.get("attention_mask")
        if isinstance(tokens, LlavaInputs):
            if mask is not None:
                raise ValueError("pass the attention mask inside the LlavaInputs, not beside it.")
            inputs = tokens.to(residual.device)
            return self._checked(residual, inputs), inputs, True
        if tokens is None:  # no tokens: positions come from the mask (or count from 0)
            ids = torch.zeros(residual.shape[:2], dtype=torch.long, device=residual.device)
        else:
            ids = torch.as_tensor(tokens, device=residual.device)
        inputs = self.prepare(input_ids=ids, attention_mask=mask)  # type: ignore[attr-defined]
        return self._checked(residual, inputs), inputs, tokens is not None

    def _checked(self, residual: Tensor, inputs: LlavaInputs) -> Tensor:
        expected = (*inputs.shape, self.cfg.d_model)
        if tuple(residual.shape) != expected:
            raise ValueError(f"the residual has shape {tuple(residual.shape)}; these inputs need {expected}.")
        return residual
