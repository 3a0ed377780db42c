"""Key/value caches for incremental decoding, in the spirit of TransformerLens'
`HookedTransformerKeyValueCacheEntry` / `HookedTransformerKeyValueCache`.

One difference from TransformerLens: the cached keys are the *rotated* keys (`hook_rot_k`), as
Hugging Face caches them, so a cache can be seeded from a `run_with_cache` (`hook_rot_k`, `hook_v`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor


class KeyValueCacheEntry:
    """One layer's past keys and values `[batch, pos_so_far, n_kv_heads, d_head]`.

    `append` returns the keys and values of all positions so far and, unless the entry is
    `frozen`, stores them, so that the next call continues from there (updated in place).
    """

    def __init__(
        self,
        past_keys: Float[Tensor, "batch pos_so_far n_kv_heads d_head"],
        past_values: Float[Tensor, "batch pos_so_far n_kv_heads d_head"],
        frozen: bool = False,
    ):
        if past_keys.shape != past_values.shape:
            raise ValueError(
                f"past keys {tuple(past_keys.shape)} and values {tuple(past_values.shape)} must have one shape "
                "[batch, pos_so_far, n_kv_heads, d_head]."
            )
        self.past_keys, self.past_values, self.frozen = past_keys, past_values, frozen

    @classmethod
    def init_cache_entry(cls, cfg: Any, device: Any = None, batch_size: int = 1) -> KeyValueCacheEntry:
        """An empty entry for a language-model layer of `cfg`."""
        shape = (batch_size, 0, cfg.n_kv_heads, cfg.d_head)
        empty = torch.empty(shape, dtype=cfg.dtype, device=device)
        return cls(empty, empty.clone())

    @property
    def n_past(self) -> int:
        return self.past_keys.shape[1]

    def append(
        self,
        new_keys: Float[Tensor, "batch new_pos n_kv_heads d_head"],
        new_values: Float[Tensor, "batch new_pos n_kv_heads d_head"],
    ) -> tuple[Tensor, Tensor]:
        """Keys and values of the past and new positions; stored unless frozen."""
        if self.n_past == 0:  # nothing to concatenate (and an empty entry's dtype does not matter)
            keys, values = new_keys, new_values
        else:
            if self.past_keys.shape[0] != new_keys.shape[0]:
                raise ValueError(
                    f"the cache holds {self.past_keys.shape[0]} rows but {new_keys.shape[0]} were given: "
                    "continue with the batch the cache was filled with."
                )
            keys = torch.cat([self.past_keys, new_keys], dim=1)
            values = torch.cat([self.past_values, new_values], dim=1)
        if not self.frozen:
            self.past_keys, self.past_values = keys, values
        return keys, values


class KeyValueCache:
    """One `KeyValueCacheEntry` per language-model layer (`cache[layer]`)."""

    def __init__(self, entries: list[KeyValueCacheEntry]):
        self.entries = entries

    @classmethod
    def init_cache(cls, cfg: Any, device: Any = None, batch_size: int = 1) -> KeyValueCache:
        """Empty entries for every layer, on `device`, or on `device[layer]` when it is a list (a model
        placed across devices keeps each layer's keys and values on that layer's device)."""
        per_layer = device if isinstance(device, (list, tuple)) else [device] * cfg.n_layers
        if len(per_layer) != cfg.n_layers:
            raise ValueError(f"give one device per layer: {len(per_layer)} devices for {cfg.n_layers} layers.")
        return cls([KeyValueCacheEntry.init_cache_entry(cfg, d, batch_size) for d in per_layer])

    def __getitem__(self, layer: int) -> KeyValueCacheEntry:
        return self.entries[layer]

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[KeyValueCacheEntry]:
        return iter(self.entries)

    def freeze(self) -> None:
        for entry in self.entries:
            entry.frozen = True

    def unfreeze(self) -> None:
        for entry in self.entries:
            entry.frozen = False
