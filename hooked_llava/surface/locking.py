"""Thread safety: one re-entrant lock per model, held for the whole of every hooked call.

TransformerLens keeps hooks as state of the hook points, so two threads that add hooks to one
model at the same time would each see the other's hooks (and fill the other's cache). Rather
than make hooks per call, every entry point that adds hooks or runs the model holds the model's
lock until it is done: concurrent calls run one after another and each sees only its own hooks.
The lock is re-entrant, so a hook or an analysis may call the model again from the same thread.

Held for the whole call by: `forward` (so `model(...)`), `run_with_hooks`, `run_with_cache`, the
`hooks()` context manager, `add_hook`, `reset_hooks`, `generate`, `embed_inputs`, `image_features`
and `run_blocks`. Hooks kept after a call (`add_hook`, `reset_hooks_end=False`) are model state that
every later call sees, whichever thread makes it. Other threads wait while a `with model.hooks():`
block runs, so do not wait there on threads that use the model. Hold `model.lock` to call submodules
directly (`model.blocks[3](x)`) from several threads; give each thread its own model for throughput.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def locked(fn: F) -> F:
    """Run a model method while holding the model's lock."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


class LockingMixin:
    """Serialises hooked calls on one model (see the module docstring)."""

    _lock: threading.RLock

    @property
    def lock(self) -> threading.RLock:
        """The model's re-entrant lock. Hold it (`with model.lock:`) to call submodules directly
        (`model.blocks[3](x)`) from several threads; the model's own entry points already do."""
        return self._lock

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Any = (),
        bwd_hooks: Any = (),
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[Any]:
        """TransformerLens' `hooks` context manager, holding the model's lock until it exits: other
        threads that use the model wait, so they never run under these hooks."""
        with self._lock, super().hooks(list(fwd_hooks), list(bwd_hooks), reset_hooks_end, clear_contexts) as m:  # type: ignore[misc]
            yield m

    @locked
    def run_with_hooks(self, *model_args: Any, **kwargs: Any) -> Any:
        """TransformerLens' `run_with_hooks`, under the model's lock."""
        return super().run_with_hooks(*model_args, **kwargs)  # type: ignore[misc]

    @locked
    def add_hook(self, *args: Any, **kwargs: Any) -> None:
        """TransformerLens' `add_hook`, under the model's lock (waits for calls in other threads)."""
        super().add_hook(*args, **kwargs)  # type: ignore[misc]

    @locked
    def reset_hooks(self, *args: Any, **kwargs: Any) -> None:
        """TransformerLens' `reset_hooks`, under the model's lock (waits for calls in other threads)."""
        super().reset_hooks(*args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        state = dict(state)
        state.pop("_lock", None)  # locks cannot be pickled or copied; each copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._lock = threading.RLock()
