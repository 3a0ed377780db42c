"""`SurfaceMixin`: HookedLlava's overrides of the TransformerLens `HookedRootModule` surface.

`run_with_cache` checks `names_filter` and returns an `ActivationCache` bound to the model; hooks are
checked by name (and against switched-off hook points) before they are added; resetting hooks and
contexts visits only the hook points that hold any; `hook_names` lists hook points in firing order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from hooked_llava.inputs import checks
from hooked_llava.model.hook_points import allow_broadcasting_hooks
from hooked_llava.surface.cache import LlavaActivationCache
from hooked_llava.surface.locking import locked


class SurfaceMixin:
    """TransformerLens-surface overrides for `HookedLlava` (placed before `HookedRootModule` in its bases)."""

    hook_dict: dict[str, Any]

    allow_broadcasting_hooks = staticmethod(allow_broadcasting_hooks)

    @locked
    def run_with_cache(self, *model_args: Any, return_cache_object: bool = True, **kwargs: Any) -> tuple[Any, Any]:
        """`HookedRootModule.run_with_cache`, returning an `ActivationCache` bound to this model (a
        `LlavaActivationCache`, which warns when `logit_attrs` cannot be exact; see `surface.cache`)."""
        checks.names_filter(kwargs.get("names_filter"), self.hook_dict)
        _check_pos_slice(kwargs.get("pos_slice"), model_args[0] if model_args else kwargs.get("input"))
        out, cache = super().run_with_cache(*model_args, **kwargs)  # type: ignore[misc]
        if not return_cache_object:
            return out, cache
        return out, LlavaActivationCache(cache, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def remove_all_hook_fns(
        self, direction: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False, level: Any = None
    ) -> None:
        """As TransformerLens', but only visits hook points that hold hooks: resetting after every
        patched run would otherwise walk hundreds of empty points."""
        for hp in self.hook_dict.values():
            if hp.fwd_hooks or hp.bwd_hooks:
                hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        for hp in self.hook_dict.values():
            if hp.ctx:
                hp.clear_context()

    def _enable_hook(self, name: Any, hook: Any, dir: Literal["fwd", "bwd"]) -> None:
        if isinstance(name, str):
            checks.hook_name(name, self.hook_dict)
            self.check_hook_fires(name)  # type: ignore[attr-defined]
        super()._enable_hook(name, hook, dir)  # type: ignore[misc]

    @property
    def hook_names(self) -> Sequence[str]:
        """All hook names, in module order (the order they fire in a forward pass)."""
        return list(self.hook_dict)


def _check_pos_slice(pos_slice: Any, input: Any) -> None:
    """An integer `pos_slice` (or list of them) must index the input's positions: name the valid range."""
    shape = getattr(input, "shape", None)
    if pos_slice is None or isinstance(pos_slice, (slice, tuple)) or shape is None or len(shape) != 2:
        return
    values = pos_slice if isinstance(pos_slice, list) else [pos_slice]
    seq = int(shape[-1])
    for value in values:
        if isinstance(value, int) and not -seq <= value < seq:
            raise IndexError(
                f"pos_slice {value} is out of range: the input has positions 0..{seq - 1} (or -{seq}..-1 from the end)."
            )
