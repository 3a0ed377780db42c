"""The logit lens: intermediate residual streams read through the final norm and the unembedding.

`logit_lens` gives the readouts as a tensor; `top_k_table` and `token_ranks` turn them into tidy
tables. The shared position and readout helpers live in `analyses.readout`.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses import ranges
from analyses.readout import Positions, at_positions, collect, lens_positions, read_out
from hooked_llava import HookedLlava, LlavaInputs

Words = str | Sequence[str] | Sequence[Sequence[str]]


def _layer_list(model: HookedLlava, layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    chosen = list(range(n + 1)) if layers is None else ranges.indices(layers, n + 1, "layer")
    if not chosen:
        raise ValueError(f"layers is empty: give at least one readout layer in 0..{n} (or None for all {n + 1}).")
    return chosen


def residual_stack(
    model: HookedLlava, inputs: LlavaInputs, positions: Positions = "last", layers: Sequence[int] | None = None
) -> Float[Tensor, "layer batch n_pos d_model"]:
    """`resid_pre` of each chosen layer (layer `n_layers` is the final `resid_post`) at `positions`.

    Example:
        >>> residual_stack(model, inputs, "last").shape  # [n_layers + 1, batch, 1, d_model]
    """
    n, chosen = model.cfg.n_layers, _layer_list(model, layers)
    names = [f"blocks.{lay}.hook_resid_pre" if lay < n else f"blocks.{n - 1}.hook_resid_post" for lay in chosen]
    select = at_positions(lens_positions(inputs, positions))
    acts = collect(model, inputs, dict.fromkeys(names, select), stop_at_layer=min(max(chosen) + 1, n))
    return torch.stack([acts[name] for name in names])


@torch.no_grad()
def logit_lens(
    model: HookedLlava,
    inputs: LlavaInputs,
    positions: Positions = "last",
    layers: Sequence[int] | None = None,
    normalize: bool = True,
) -> Float[Tensor, "layer batch n_pos d_vocab"]:
    """Read each layer's residual stream through the final norm and the unembedding.

    Args:
        model: the model.
        inputs: the prepared batch.
        positions: a role, a list of positions, a `[batch, n_pos]` tensor or a bool mask (see
            `lens_positions`); every row must select the same number of positions.
        layers: which readouts, in `0..n_layers`: layer `l < n_layers` is `resid_pre[l]`, layer
            `n_layers` (or -1) the final `resid_post`; negative layers count from the end, and
            layers outside `-(n_layers + 1)..n_layers` raise. Default: all `n_layers + 1`.
        normalize: apply the final RMSNorm (with its weight) before `W_U`: the standard logit
            lens. `False` reads raw residuals through `W_U`, as study B's code does.

    Returns:
        Logits `[layer, batch, n_pos, d_vocab]`; with `normalize=True` the final layer equals the
        model's logits at those positions.

    Example:
        >>> lens = logit_lens(model, inputs, positions="last")
        >>> lens[-1, :, 0].argmax(-1)  # the model's predictions
    """
    return read_out(model, residual_stack(model, inputs, positions, layers), normalize)


def _labels(
    model: HookedLlava, lens: Tensor, layers: Sequence[int] | None, positions: Tensor | None
) -> tuple[list[int], Tensor]:
    layer_ids = list(range(lens.shape[0])) if layers is None else _layer_list(model, layers)
    if len(layer_ids) != lens.shape[0]:
        raise ValueError(f"{len(layer_ids)} layer labels for {lens.shape[0]} readouts.")
    pos = torch.arange(lens.shape[2]).expand(lens.shape[1], -1) if positions is None else positions.cpu()
    return layer_ids, pos


def top_k_table(
    model: HookedLlava,
    lens: Float[Tensor, "layer batch n_pos d_vocab"],
    k: int = 10,
    layers: Sequence[int] | None = None,
    positions: Int[Tensor, "batch n_pos"] | None = None,
) -> pd.DataFrame:
    """Tidy table of the top-k tokens of each readout.

    Args:
        model: the model (for decoding tokens).
        lens: output of `logit_lens`.
        k: tokens per readout, in `1..d_vocab`.
        layers: labels of the readouts (the `layers` given to `logit_lens`); default `0..`.
        positions: sequence positions to label rows with (`lens_positions(inputs, ...)`);
            default the index into `n_pos`.

    Returns:
        Columns `layer, batch, position, rank` (1 = top), `token_id, token, logit, prob`.

    Example:
        >>> lens = logit_lens(model, inputs, "image")
        >>> top_k_table(model, lens, k=5, positions=lens_positions(inputs, "image"))
    """
    layer_ids, pos = _labels(model, lens, layers, positions)
    logits, ids = lens.float().topk(ranges.count(k, "k", 1, lens.shape[-1]), dim=-1)
    probs = lens.float().softmax(-1).gather(-1, ids)
    index = torch.cartesian_prod(*(torch.arange(n) for n in ids.shape))
    flat_ids = ids.flatten().cpu()
    return pd.DataFrame(
        {
            "layer": [layer_ids[i] for i in index[:, 0].tolist()],
            "batch": index[:, 1].numpy(),
            "position": pos[index[:, 1], index[:, 2]].numpy(),
            "rank": index[:, 3].numpy() + 1,
            "token_id": flat_ids.numpy(),
            "token": model.to_str_tokens(flat_ids),
            "logit": logits.flatten().cpu().numpy(),
            "prob": probs.flatten().cpu().numpy(),
        }
    )


def word_forms(model: HookedLlava, word: str) -> dict[str, int]:
    """Single-token forms of a word: lowercase and capitalised, bare and with a leading space.

    Forms that are not a single token (or are unknown to the vocabulary) are skipped; forms
    mapping to the same id are kept once. A word with no single-token form at all raises a
    ValueError naming it (with the vocabulary's closest words when it is unknown).

    Example:
        >>> word_forms(model, "red")  # e.g. {"red": 21} when "Red" is not a single token
    """
    forms: dict[str, int] = {}
    errors: list[ValueError] = []
    for base in dict.fromkeys([word.lower(), word[:1].upper() + word[1:].lower()]):
        for form in (base, " " + base):
            try:
                token = model.to_single_token(form)
            except ValueError as error:
                errors.append(error)
                continue
            if token not in forms.values():
                forms[form] = token
    if not forms:
        raise ValueError(f"no form of {word!r} is a single token: {errors[0]}")
    return forms


def _row_words(words: Words, batch: int) -> list[list[str]]:
    if isinstance(words, str):
        return [[words]] * batch
    if words and not isinstance(words[0], str):
        if len(words) != batch:
            raise ValueError(f"per-row words need one list per row: got {len(words)} for {batch} rows.")
        return [list(w) for w in words]
    return [list(words)] * batch  # type: ignore[arg-type]


def token_ranks(
    model: HookedLlava,
    lens: Float[Tensor, "layer batch n_pos d_vocab"],
    words: Words,
    layers: Sequence[int] | None = None,
    positions: Int[Tensor, "batch n_pos"] | None = None,
) -> pd.DataFrame:
    """Rank and probability of chosen words at every readout, all case forms tracked together.

    Args:
        model: the model (for tokenising words).
        lens: output of `logit_lens`.
        words: a word, a list of words for every row, or one list of words per row. Each word
            is tracked in all its single-token forms (`word_forms`: "red", "Red", " red", ...).
        layers, positions: labels, as in `top_k_table`.

    Returns:
        Columns `layer, batch, position, word, form, token_id, rank` (1 = top), `prob, logit`.

    Example:
        >>> token_ranks(model, logit_lens(model, inputs), ["red", "blue"]).query("form == 'red'")
    """
    layer_ids, pos = _labels(model, lens, layers, positions)
    logits = lens.float()
    probs, records = logits.softmax(-1), []
    for b, row_words in enumerate(_row_words(words, lens.shape[1])):
        for word in row_words:
            for form, token in word_forms(model, word).items():
                value = logits[:, b, :, token]  # [layer, n_pos]
                rank = (logits[:, b] > value[..., None]).sum(-1) + 1
                for li, p in torch.cartesian_prod(torch.arange(lens.shape[0]), torch.arange(lens.shape[2])).tolist():
                    records.append(
                        (
                            layer_ids[li],
                            b,
                            int(pos[b, p]),
                            word,
                            form,
                            token,
                            int(rank[li, p]),
                            float(probs[li, b, p, token]),
                            float(value[li, p]),
                        )
                    )
    columns = ["layer", "batch", "position", "word", "form", "token_id", "rank", "prob", "logit"]
    return pd.DataFrame.from_records(records, columns=columns)
