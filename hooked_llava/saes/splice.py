"""Sparse autoencoders (SAELens `SAE` objects) spliced into HookedLlava at any hook point.

`HookedSAELlava` is `HookedLlava` with SAELens's `HookedSAETransformer` surface: `add_sae`,
`reset_saes`, `saes`, `run_with_saes`, `run_with_cache_with_saes` and `run_with_hooks_with_saes`.
An attached SAE replaces the hook point it reads (as SAELens does with `set_deep_attr`), so it acts
at every position that hook sees, text and image alike. Its internals are hook points under the
replaced hook's name, with SAELens's names: `<hook>.hook_sae_input`, `.hook_sae_acts_pre`,
`.hook_sae_acts_post` (the feature activations), `.hook_sae_recons`, `.hook_sae_error` and
`.hook_sae_output`. With `use_error_term=True` the output is the reconstruction plus the SAE's
error on the clean input, so the forward is unchanged until a feature is edited.

SAELens itself is not imported here: any object with SAELens's `SAE` interface (`cfg.d_in`,
`cfg.metadata.hook_name`, `encode`, `decode`, `hook_dict`, `use_error_term`) can be attached.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from jaxtyping import Float
from torch import Tensor, nn

from hooked_llava.inputs import checks
from hooked_llava.model.components import HookPoint
from hooked_llava.model.hooked_llava import HookedLlava

_OWN_HOOKS = ("hook_sae_error", "hook_sae_output")


@contextmanager
def _hooks_silenced(sae: Any) -> Iterator[None]:
    """Run the SAE with none of its hook functions firing (for the clean error term)."""
    points = list(sae.hook_dict.values())
    saved = [(p._forward_hooks, p._backward_hooks) for p in points]
    try:
        for p in points:
            p._forward_hooks, p._backward_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for p, (fwd, bwd) in zip(points, saved, strict=True):
            p._forward_hooks, p._backward_hooks = fwd, bwd


class SAESplice(HookPoint):
    """Stands in for a hook point: encodes and decodes its activation with an SAE.

    The SAE is kept out of the module tree (so hook names carry no `.sae.` infix); its hook
    points are registered here directly, except the error and output hooks, which this module
    owns because it computes those values. The splice is itself a hook point under the replaced
    hook's name: hooks there (a user's permanent hooks are carried over) see the SAE's output,
    the value the model goes on with.
    """

    def __init__(self, sae: Any, use_error_term: bool, hook_name: str):
        super().__init__()
        self.__dict__["sae"] = sae
        for name, point in sae.hook_dict.items():
            if name not in _OWN_HOOKS:
                setattr(self, name, point)
        self.hook_sae_error = HookPoint()
        self.hook_sae_output = HookPoint()
        self.use_error_term = use_error_term
        self.hook_name = hook_name

    def __call__(self, x: Any) -> Any:
        return nn.Module.__call__(self, x)  # always run the SAE (a plain HookPoint skips itself when idle)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        d_in = self.sae.cfg.d_in
        if x.shape[-1] != d_in:
            raise ValueError(
                f"the SAE at {self.hook_name!r} reads vectors of size {d_in}, but this hook carries size "
                f"{x.shape[-1]} (shape {tuple(x.shape)}): attach it to a hook of width {d_in}."
            )
        out = self.sae.decode(self.sae.encode(x))
        if self.use_error_term:
            with _hooks_silenced(self.sae):
                clean = self.sae.decode(self.sae.encode(x.detach())).detach()
            out = out + self.hook_sae_error((x.detach() - clean).to(out.dtype))
        return self.hook_sae_output(out.to(x.dtype))


# Where a module keeps its hooks (torch's dicts and TransformerLens' handles): moved as a whole, so the
# handles a user holds still remove their hooks.
_HOOK_STATE = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_is_full_backward_hook",
    "fwd_hooks", "bwd_hooks", "ctx",
)  # fmt: skip
# Hooks whose activation is not a `[..., d]` vector per position: no SAE reads them.
_NOT_VECTORS = ("hook_pattern", "hook_attn_scores")


def _move_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` every hook `src` holds (permanent ones included) and leave `src` with none."""
    fresh = HookPoint()
    for attr in _HOOK_STATE:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))
            setattr(src, attr, getattr(fresh, attr))


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def _set(obj: Any, path: str, value: nn.Module) -> None:
    *parents, last = path.split(".")
    setattr(_get(obj, ".".join(parents)) if parents else obj, last, value)


class HookedSAELlava(HookedLlava):
    """HookedLlava that takes SAELens SAEs at any hook point, with SAELens's semantics.

    Example:
        >>> from sae_lens import SAE
        >>> model = HookedSAELlava.from_pretrained("shapes-llava")
        >>> sae = SAE.load_from_disk(checkpoint_path("shapes-llava-sae"))
        >>> logits, cache = model.run_with_cache_with_saes(inputs, saes=[sae])
        >>> cache["blocks.4.hook_resid_post.hook_sae_acts_post"]  # [batch, pos, d_sae]
    """

    def __init__(self, cfgs: Any, processor: Any = None):
        super().__init__(cfgs, processor)
        self._splices: dict[str, SAESplice] = {}

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """The attached SAEs, by the hook name each replaces."""
        return {name: splice.sae for name, splice in self._splices.items()}

    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        """Attach an SAE at its `cfg.metadata.hook_name` until `reset_saes` (replacing one already there).

        Args:
            sae: a SAELens `SAE` whose `d_in` is the width of that hook.
            use_error_term: add the SAE's error so the forward is exact; None keeps `sae.use_error_term`.
        """
        name = _hook_of(sae)
        if getattr(sae.cfg.metadata, "hook_name_out", None) not in (None, name):
            raise ValueError(f"transcoders (hook_name_out={sae.cfg.metadata.hook_name_out!r}) are not supported.")
        if name in self._splices:
            self._reset_sae(name)
            self.setup()
        checks.hook_name(name, self.hook_dict)
        point = _get(self, name)
        if not isinstance(point, HookPoint):
            raise ValueError(f"{name!r} is an SAE's internal hook; attach SAEs to the model's own hook points.")
        if name.endswith(_NOT_VECTORS):
            raise ValueError(
                f"{name!r} carries attention scores/patterns [batch, head, query, key], not one vector per "
                "position: an SAE cannot read it. Attach it to hook_z, hook_attn_out or a residual hook instead."
            )
        if not self.hook_fires(name):  # the SAE would silently never run
            raise ValueError(f"an SAE at {self._off_message(name)}")
        error = sae.use_error_term if use_error_term is None else use_error_term
        self._splices[name] = SAESplice(sae, bool(error), name)
        _move_hooks(point, self._splices[name])  # the user's hooks at this point keep firing
        _set(self, name, self._splices[name])
        self.setup()

    def _reset_sae(self, name: str) -> None:
        if name not in self._splices:
            raise KeyError(f"no SAE is attached at {name!r}; attached: {sorted(self._splices) or 'none'}.")
        point = HookPoint()
        _move_hooks(self._splices.pop(name), point)
        _set(self, name, point)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Detach the SAEs at these hook names (all of them by default), restoring plain hook points."""
        names = [act_names] if isinstance(act_names, str) else list(act_names or self._splices)
        for name in names:
            self._reset_sae(name)
        self.setup()

    @contextmanager
    def saes(self, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None) -> Iterator[Any]:
        """Attach SAEs for the duration of a `with` block; on exit restore what was attached before."""
        saes = [saes] if hasattr(saes, "cfg") else list(saes)
        before = {_hook_of(s): self._splices.get(_hook_of(s)) for s in saes}
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                self._restore(before)

    def _restore(self, before: dict[str, SAESplice | None]) -> None:
        for name, previous in before.items():
            if name in self._splices:
                self._reset_sae(name)
            if previous is not None:
                self._splices[name] = previous
                _move_hooks(_get(self, name), previous)
                _set(self, name, previous)
        self.setup()

    def run_with_saes(
        self, *args: Any, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None, **kw: Any
    ) -> Any:
        """The forward pass with `saes` attached (then detached, unless `reset_saes_end=False`)."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*args, **kw)

    def run_with_cache_with_saes(
        self, *args: Any, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None, **kw: Any
    ) -> tuple[Any, Any]:
        """`run_with_cache` with `saes` attached: the cache holds `<hook>.hook_sae_acts_post` etc."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_cache(*args, **kw)

    def run_with_hooks_with_saes(
        self, *args: Any, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None, **kw: Any
    ) -> Any:
        """`run_with_hooks` with `saes` attached; hooks may name the SAEs' internal hook points."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_hooks(*args, **kw)


def _hook_of(sae: Any) -> str:
    name = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "hook_name", None)
    if not isinstance(name, str):
        raise ValueError(
            "the SAE has no cfg.metadata.hook_name: set it to the hook it reads, e.g. 'blocks.4.hook_resid_post'."
        )
    return name
