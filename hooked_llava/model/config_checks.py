"""Range checks on Hugging Face config values, and the errors that refuse a config.

`UnsupportedConfigError` says HookedLlava does not implement what a config asks for;
`InvalidConfigError` (a subclass) says a value is nonsense: a non-positive size or epsilon,
heads that do not divide the width. Each message names the field and its value.
"""

from __future__ import annotations

from typing import Any


class UnsupportedConfigError(ValueError):
    """A Hugging Face config asks for something HookedLlava does not implement."""


class InvalidConfigError(UnsupportedConfigError):
    """A config value is out of range: a non-positive size or epsilon, heads that do not divide the width."""


def _check_sizes(where: str, config: Any, *names: str) -> None:
    """Each named field is a positive integer."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InvalidConfigError(f"{where}: {name}={value!r} must be a positive integer; fix config.json.")


def check_positive(where: str, config: Any, *names: str) -> None:
    """Each named field is a finite number above zero (epsilons, rope_theta)."""
    for name in names:
        value = getattr(config, name, None)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
        if not ok:
            raise InvalidConfigError(f"{where}: {name}={value!r} must be a finite number above 0; fix config.json.")


def _check_divides(where: str, part: str, a: int, whole: str, b: int) -> None:
    if b % a:
        raise InvalidConfigError(f"{where}: {part}={a} does not divide {whole}={b}; fix config.json.")


def validate_text(text: Any) -> None:
    where = "text config"
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    _check_sizes(where, text, *sizes, "max_position_embeddings")
    check_positive(where, text, "rms_norm_eps")
    if getattr(text, "head_dim", None) is not None:
        _check_sizes(where, text, "head_dim")
    else:
        _check_divides(where, "num_attention_heads", text.num_attention_heads, "hidden_size", text.hidden_size)
    if getattr(text, "num_key_value_heads", None) is not None:
        _check_sizes(where, text, "num_key_value_heads")
        heads = text.num_attention_heads
        _check_divides(where, "num_key_value_heads", text.num_key_value_heads, "num_attention_heads", heads)
    if getattr(text, "sliding_window", None) is not None:
        _check_sizes(where, text, "sliding_window")


def validate_vision(v: Any) -> None:
    where = "vision config"
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size")
    _check_sizes(where, v, *sizes, "patch_size", "num_channels")
    check_positive(where, v, "layer_norm_eps")
    _check_divides(where, "num_attention_heads", v.num_attention_heads, "hidden_size", v.hidden_size)
    if v.patch_size > v.image_size:
        raise InvalidConfigError(f"{where}: patch_size={v.patch_size} is larger than image_size={v.image_size}.")
