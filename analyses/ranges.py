"""Range checks shared by the analyses' index arguments: layers, heads, positions, token ids, counts.

Indices follow Python and TransformerLens: `-1` is the last layer (or position, or head) and
negative indices count from the end, but only within range. Anything outside raises an
`OutOfRange` error (both an `IndexError` and a `ValueError`) that names the valid range, so
that no argument wraps around silently.

    >>> index(-1, 5, "layer")
    4
    >>> index(7, 5, "layer")
    Traceback (most recent call last):
    ...
    analyses.ranges.OutOfRange: layer 7 is out of range: valid layers are 0..4 (or -5..-1 from the end).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from hooked_llava import LlavaInputs


class OutOfRange(IndexError, ValueError):
    """An index argument outside its valid range (an `IndexError` and a `ValueError`)."""


def _as_int(value: Any, name: str) -> int:
    try:
        return operator.index(value.item() if isinstance(value, Tensor) and value.numel() == 1 else value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}.") from None


def index(value: Any, size: int, name: str) -> int:
    """`value` as an index into `size` items, negatives counting from the end; out of range raises."""
    i = _as_int(value, name)
    if not -size <= i < size:
        valid = f"0..{size - 1} (or -{size}..-1 from the end)" if size else "none (there are none)"
        raise OutOfRange(f"{name} {i} is out of range: valid {name}s are {valid}.")
    return i % size


def indices(values: Iterable[Any] | int | Tensor, size: int, name: str) -> list[int]:
    """`index` for each of `values` (an int alone counts as one)."""
    items = [values] if isinstance(values, int) or (isinstance(values, Tensor) and values.ndim == 0) else values
    return [index(v, size, name) for v in items]  # type: ignore[union-attr]


def count(value: Any, name: str, low: int = 1, high: int | None = None) -> int:
    """An integer count such as `k`, `window` or `batch_size`, within `low..high`."""
    n = _as_int(value, name)
    if n < low or (high is not None and n > high):
        valid = f"{low}..{high}" if high is not None else f"{low} or more"
        raise OutOfRange(f"{name} must be in {valid}, got {n}.")
    return n


def token_id(value: Any, d_vocab: int) -> int:
    """A token id within the vocabulary `0..d_vocab-1` (no negative ids)."""
    i = _as_int(value, "token id")
    if not 0 <= i < d_vocab:
        raise OutOfRange(f"token id {i} is out of range: the vocabulary has ids 0..{d_vocab - 1}.")
    return i


def positions(inputs: LlavaInputs, value: str | Sequence[int] | Tensor) -> str | list[int] | Tensor:
    """A role name unchanged; a bool mask checked against `[batch, pos]`; explicit positions (a list,
    a `[n]` or a per-row `[batch, n]` tensor) range-checked and made non-negative.

    Negative positions count back from each row's last real token (`-1` is `inputs.last`). With left
    padding (or none) that is the end of the sequence, and a list stays a list; on a right-padded
    batch the result is a per-row `[batch, n]` tensor, so `-1` never lands on a padding position."""
    if isinstance(value, str):
        return value
    batch, seq = inputs.input_ids.shape
    t = torch.as_tensor(value)
    if t.dtype == torch.bool:
        if t.ndim not in (1, 2) or t.shape[-1] != seq or (t.ndim == 2 and t.shape[0] not in (1, batch)):
            raise ValueError(f"a position mask must be [pos] or [batch, pos] = [{batch}, {seq}], got {tuple(t.shape)}.")
        return value  # type: ignore[return-value]
    if t.is_floating_point() or t.ndim > 2 or (t.ndim == 2 and t.shape[0] != batch):
        raise ValueError(f"positions must be a role, a list of ints or a [batch={batch}, n] int tensor, got {value!r}.")
    bad = t[(t < -seq) | (t >= seq)]
    if bad.numel():
        raise OutOfRange(
            f"position {int(bad[0])} is out of range: the sequence has positions 0..{seq - 1} "
            f"(or -{seq}..-1 from the end)."
        )
    ends = inputs.last.cpu() + 1  # [batch]: a negative position counts back from each row's last real token
    if bool((t < 0).any()) and bool((ends < seq).any()):
        return _from_row_ends(t.long(), ends).to(inputs.input_ids.device)
    fixed = t.long() % seq
    return fixed.to(inputs.input_ids.device) if t.ndim == 2 else fixed.reshape(-1).tolist()


def _from_row_ends(t: Tensor, ends: Tensor) -> Tensor:
    """Per-row `[batch, n]` positions on a right-padded batch: `-1` is each row's last real token (as
    `inputs.last`), not a padding position at the end of the shorter rows."""
    rows = t.expand(len(ends), -1) if t.ndim == 1 else t
    fixed = torch.where(rows < 0, rows + ends[:, None], rows)
    if bool((fixed < 0).any()):
        r = int((fixed < 0).any(1).nonzero()[0, 0])
        raise OutOfRange(
            f"position {int(rows[r][fixed[r] < 0][0])} is out of range in row {r}: negative positions count back "
            f"from each row's last real token, and row {r} has {int(ends[r])} tokens."
        )
    return fixed
