"""`HookPoint`: TransformerLens' hook point, free when nothing is attached, with checked hook returns.

A forward hook's return value replaces the activation, so it must have the activation's shape and
dtype: anything else would broadcast or cast silently through the rest of the model. Hooks are
wrapped when they are added, so the check costs nothing on hook points without hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from torch import Tensor
from transformer_lens.hook_points import HookPoint as _TLHookPoint

_BROADCASTING = ContextVar("hooked_llava_broadcasting_hooks", default=False)


@contextmanager
def allow_broadcasting_hooks() -> Iterator[None]:
    """Within this block (in this thread), forward hooks may return a tensor of another shape or
    dtype than their input, e.g. `[batch, pos, 1]` from `hook_resid_pre` to broadcast on purpose."""
    token = _BROADCASTING.set(True)
    try:
        yield
    finally:
        _BROADCASTING.reset(token)


def _checked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a forward hook so that a return value of the wrong shape or dtype raises."""

    @functools.wraps(fn)
    def hook_fn(x: Any, *, hook: Any) -> Any:
        out = fn(x, hook=hook)
        if out is None or out is x or not isinstance(x, Tensor):
            return out
        if isinstance(out, Tensor) and out.shape == x.shape and out.dtype == x.dtype:
            return out
        if _BROADCASTING.get():
            return out
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        name = getattr(getattr(fn, "func", fn), "__name__", type(fn).__name__)
        raise ValueError(
            f"the hook {name!r} on {hook.name!r} returned {got}, but its input is "
            f"{tuple(x.shape)} {x.dtype}: a forward hook must return None or a tensor of its input's shape and "
            "dtype. To broadcast on purpose, run inside `with model.allow_broadcasting_hooks():`."
        )

    return hook_fn


class NoLayerError(IndexError, ValueError):
    """`HookPoint.layer()` on a hook outside the blocks (TransformerLens raises IndexError or ValueError)."""


class HookPoint(_TLHookPoint):
    """A TransformerLens `HookPoint` that skips `nn.Module` dispatch when nothing is attached and
    checks that forward hooks return their input's shape and dtype (see `allow_broadcasting_hooks`)."""

    def __call__(self, x: Any) -> Any:
        if self._forward_hooks or self._backward_hooks:
            return super().__call__(x)
        return x

    def active(self) -> bool:
        return bool(self._forward_hooks or self._backward_hooks)

    def layer(self) -> int:
        """The index of the block this hook is in: `blocks.3.attn.hook_pattern` → 3, and for the
        vision tower `vision.blocks.1.hook_resid_post` → 1 (select language-model hooks alone with
        `lambda name: name.startswith("blocks.")`). A hook outside any block has no layer: as
        TransformerLens' `hook_embed`, it raises an `IndexError` (also a `ValueError` here)."""
        parts = (self.name or "").split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "blocks" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        raise NoLayerError(f"hook {self.name!r} is not inside a block, so it has no layer index.")

    def add_hook(self, hook: Callable[..., Any], dir: Literal["fwd", "bwd"] = "fwd", *args: Any, **kwargs: Any) -> Any:
        # TransformerLens 4 returns the handle; 3.x returns None
        return super().add_hook(_checked(hook) if dir == "fwd" else hook, dir, *args, **kwargs)
