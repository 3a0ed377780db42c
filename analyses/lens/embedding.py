"""Visual embeddings in vocabulary space (study A).

Each image position's projector output — the vector the language model receives at layer 0 —
is compared with the input embedding matrix `W_E` or read through the unembedding as a logit
lens (final norm, then `W_U`). METHODS.md §2 does not name the similarity used with `W_E`; the
default is the dot product (study A's choice as the project brief records it), with cosine as
an option. `mrr` measures how highly given tokens (e.g. the correct colour) rank at chosen
positions.

The examples in this module's docstrings run on a tiny random model:

    >>> from hooked_llava.testing import random_images, tiny_model
    >>> model, _ = tiny_model()
    >>> inputs = model.prepare(images=random_images(2), questions=["What is the color of the circle?", "Is it red?"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from analyses import ranges
from analyses.readout import collect, read_out
from hooked_llava import HookedLlava, LlavaInputs

Matrix = Literal["E", "U"]
Similarity = Literal["dot", "cosine"]
Tokens = int | str | Sequence[int | str | Sequence[int | str]]


def vocab_scores(
    model: HookedLlava,
    vectors: Float[Tensor, "*lead d_model"],
    matrix: Matrix = "E",
    similarity: Similarity = "dot",
    normalize: bool = True,
) -> Float[Tensor, "*lead d_vocab"]:
    """Score residual-space vectors against every token.

    Args:
        model: the model.
        vectors: vectors in the residual space.
        matrix: "E": similarity with the rows of the input embedding `W_E`; "U": logits
            through the unembedding (the logit lens).
        similarity: for "E", "dot" (study A) or "cosine". "U" is always a dot product.
        normalize: for "U", apply the final RMSNorm (with its weight) first.

    Example:
        >>> vocab_scores(model, model.W_E[:2], "E").argmax(-1)  # usually the tokens themselves
    """
    if matrix == "U":
        if similarity != "dot":
            raise ValueError("matrix='U' is the logit lens (a dot product with W_U); use similarity='dot'.")
        return read_out(model, vectors, normalize)
    if matrix != "E":
        raise ValueError(f"matrix must be 'E' (input embedding) or 'U' (unembedding), got {matrix!r}.")
    W_E = model.W_E.float()
    if similarity == "cosine":
        return F.normalize(vectors.float(), dim=-1) @ F.normalize(W_E, dim=-1).T
    if similarity != "dot":
        raise ValueError(f"similarity must be 'dot' or 'cosine', got {similarity!r}.")
    return vectors.float() @ W_E.T


def layer0_inputs(model: HookedLlava, inputs: LlavaInputs) -> Float[Tensor, "batch pos d_model"]:
    """The merged embeddings (`hook_embed`): at image positions the projector output
    (`projector.hook_out` of LLaVA-1.5, in placeholder order), token embeddings elsewhere.
    Only the vision tower and projector run, not the language model.

    Example:
        >>> layer0_inputs(model, inputs)[inputs.mask("image")].shape  # [n_image_tokens, d_model]
    """
    return collect(model, inputs, {"hook_embed": lambda a: a}, stop_at_layer=0)["hook_embed"]


@torch.no_grad()
def embedding_projection(
    model: HookedLlava,
    inputs: LlavaInputs,
    matrix: Matrix = "E",
    k: int = 20,
    similarity: Similarity = "dot",
    normalize: bool = True,
) -> pd.DataFrame:
    """Top-k tokens of every image position's projector output.

    Args:
        model: the model.
        inputs: the prepared batch.
        matrix, similarity, normalize: see `vocab_scores` (default: dot product with `W_E`).
        k: tokens per image position, in `1..d_vocab`.

    Returns:
        Columns `image, token_index` (index within the image's tokens), `batch, position`
        (where it sits in the sequence), `row, col` (`inputs.patch_rc()`; -1 for CLS and
        NeXT newlines), `rank` (1 = top), `token_id, token, score`.

    Example:
        >>> table = embedding_projection(model, inputs, "E", k=5)
        >>> table.query("rank == 1")[["row", "col", "token"]]
    """
    k = ranges.count(k, "k", 1, model.cfg.d_vocab)
    embeds = layer0_inputs(model, inputs)
    where = inputs.image_mask.nonzero().cpu()  # row-major: the order the image features fill placeholders
    scores, ids = vocab_scores(model, embeds[where[:, 0], where[:, 1]], matrix, similarity, normalize).topk(k, dim=-1)
    image = inputs.image_index().cpu()[where[:, 0], where[:, 1]]
    counts = torch.bincount(image)
    token_index = torch.arange(len(image)) - (counts.cumsum(0) - counts)[image]
    rc = inputs.patch_rc().cpu()[where[:, 0], where[:, 1]]
    flat = torch.arange(len(where)).repeat_interleave(k)
    columns = {"image": image, "token_index": token_index, "batch": where[:, 0], "position": where[:, 1]}
    frame = pd.DataFrame({name: values[flat].numpy() for name, values in columns.items()})
    frame["row"], frame["col"] = rc[flat, 0].numpy(), rc[flat, 1].numpy()
    frame["rank"] = torch.arange(1, k + 1).repeat(len(where)).numpy()
    frame["token_id"], frame["score"] = ids.flatten().cpu().numpy(), scores.flatten().cpu().numpy()
    frame["token"] = model.to_str_tokens(ids.flatten().cpu())
    return frame[[*columns, "row", "col", "rank", "token_id", "token", "score"]]


def reciprocal_ranks(scores: Float[Tensor, "*lead d_vocab"], tokens: Int[Tensor, "*lead"]) -> Float[Tensor, "*lead"]:
    """`1 / rank` of each token in its score vector (rank 1 = highest; ties count in its favour).

    Example:
        >>> reciprocal_ranks(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2]))  # tensor([0.5])
    """
    value = scores.gather(-1, tokens[..., None])
    return 1.0 / ((scores > value).sum(-1) + 1).float()


def _row_tokens(model: HookedLlava, tokens: Tokens, batch: int) -> list[list[int]]:
    as_id = lambda t: model.to_single_token(t) if isinstance(t, str) else ranges.token_id(t, model.cfg.d_vocab)  # noqa: E731
    if isinstance(tokens, (int, str)):
        return [[as_id(tokens)]] * batch
    if len(tokens) != batch:
        raise ValueError(f"give one token for all rows or one entry per row: got {len(tokens)} for {batch} rows.")
    return [[as_id(t)] if isinstance(t, (int, str)) else [as_id(x) for x in t] for t in tokens]


@torch.no_grad()
def mrr(
    model: HookedLlava,
    inputs: LlavaInputs,
    tokens: Tokens,
    positions: str | Sequence[int] | Tensor = "image",
    matrix: Matrix = "E",
    similarity: Similarity = "dot",
    normalize: bool = True,
) -> pd.DataFrame:
    """Mean reciprocal rank of target tokens over chosen positions of the layer-0 input.

    The vector at each position is the merged embedding (`hook_embed`): the projector output at
    image positions, the token embedding elsewhere. Study A takes the top-20 image positions
    of an important head and the correct colour (or animal) token.

    Args:
        model: the model.
        inputs: the prepared batch.
        tokens: one token (id or single-token string) for every row, or one entry per row (a
            token or a list of tokens).
        positions: a role name, a list of positions for every row, or a `[batch, pos]` bool
            mask / `[batch, n]` index tensor (rows may select different numbers of positions).
        matrix, similarity, normalize: see `vocab_scores`.

    Returns:
        Columns `batch, token_id, token, mrr, n_positions`.

    Example:
        >>> mrr(model, inputs, "red", positions="image")
    """
    embeds, mask = layer0_inputs(model, inputs), _position_mask(inputs, positions)
    records = []
    for b, row_tokens in enumerate(_row_tokens(model, tokens, len(inputs))):
        scores = vocab_scores(
            model, embeds[b, mask[b].to(embeds.device)], matrix, similarity, normalize
        )  # [n, d_vocab]
        for token in row_tokens:
            rr = reciprocal_ranks(scores, torch.full(scores.shape[:1], token, device=scores.device))
            records.append((b, token, model.to_single_str_token(int(token)), float(rr.mean()), len(rr)))
    return pd.DataFrame.from_records(records, columns=["batch", "token_id", "token", "mrr", "n_positions"])


def _position_mask(inputs: LlavaInputs, positions: str | Sequence[int] | Tensor) -> Tensor:
    positions = ranges.positions(inputs, positions)
    if isinstance(positions, Tensor) and positions.ndim == 2 and positions.dtype != torch.bool:
        mask = torch.zeros_like(inputs.input_ids, dtype=torch.bool)
        return mask.scatter(1, positions.long().to(mask.device), True)
    return inputs.as_mask(positions if isinstance(positions, (str, Tensor)) else list(positions))
