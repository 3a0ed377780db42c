"""TransformerLens' hook switches and caching conventions for `HookedLlava`.

The switches (`set_use_attn_result`, `set_use_split_qkv_input`, `set_use_hook_mlp_in`,
`set_use_attn_in`) have TransformerLens' names, defaults (off) and meaning: the hooks they govern
exist in `model.hook_dict` but only fire while switched on. They set `model.cfg` and the vision
tower's `model.vision.cfg` alike, so that, as a TransformerLens user expects, `set_use_attn_result(True)`
gives per-head results everywhere (`vision.blocks.*.attn.hook_result` too). Setting `model.cfg.use_...`
directly switches the language model alone.

Hooks of the vision tower share the language model's suffixes, so a filter such as
`lambda name: name.endswith("pattern")` also matches `vision.blocks.*`; select language-model hooks
alone with `lambda name: name.startswith("blocks.")`. `transformer_lens.utilities.get_act_name`
(`utils.get_act_name` in TransformerLens 3) gives language-model names, e.g. `blocks.3.attn.hook_pattern`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from transformer_lens.utilities.slice import Slice

# hook suffix → the config switch that makes it fire
SWITCHED = {
    "attn.hook_result": "use_attn_result",
    "hook_q_input": "use_split_qkv_input",
    "hook_k_input": "use_split_qkv_input",
    "hook_v_input": "use_split_qkv_input",
    "hook_attn_in": "use_attn_in",
    "hook_mlp_in": "use_hook_mlp_in",
}
SETTERS = {
    "use_attn_result": "set_use_attn_result",
    "use_split_qkv_input": "set_use_split_qkv_input",
    "use_attn_in": "set_use_attn_in",
    "use_hook_mlp_in": "set_use_hook_mlp_in",
}
NOT_PER_POSITION = ("hook_image_newline", "hook_image_features")  # not indexed by sequence position


def pos_dim(name: str) -> int | None:
    """The position dimension of a batched activation: the query of `[batch, head, query, key]`
    scores and patterns, dimension 1 of everything else (`[batch, pos, ...]`, rotary q/k included)."""
    if name.endswith(NOT_PER_POSITION):
        return None
    return 2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


class HookingMixin:
    """Needs `cfg`, `vision` and `hook_dict` (see `HookedLlava`)."""

    cfg: Any
    vision: Any
    hook_dict: dict[str, Any]

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute each head's output `hook_result` `[batch, pos, head, d_model]` (costs memory)."""
        self._set_switch("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own query, key and value input (`hook_q_input` etc.), to patch them apart."""
        self._set_switch("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """Fire `hook_mlp_in`, the MLP's input before its norm."""
        self._set_switch("use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """Give attention one input per head (`hook_attn_in`); as TransformerLens, not for grouped-query attention."""
        if use_attn_in and self.cfg.n_kv_heads != self.cfg.n_heads:
            raise ValueError(
                "use_attn_in is for multi-head attention; this model has grouped-query attention "
                f"({self.cfg.n_heads} query and {self.cfg.n_kv_heads} key/value heads): use set_use_split_qkv_input."
            )
        self._set_switch("use_attn_in", use_attn_in)

    def set_use_eager_attention(self, use_eager_attention: bool) -> None:
        """Run every attention on its explicit softmax path and every (vision) LayerNorm on its explicit
        formula, as they run when their hooks are in use, so that attaching any hook that only reads
        changes no logit. Off by default: attention without score/pattern hooks then runs fused
        (`scaled_dot_product_attention`) and LayerNorm without hooks runs `F.layer_norm`, which round
        differently, so attaching such a hook moves fp32 logits by about 1e-7 relative (~1e-5 at logits
        of ~30). `set_use_attn_result` and the per-head input switches also change the arithmetic (as in
        TransformerLens)."""
        self._set_switch("use_eager_attention", use_eager_attention)

    @contextmanager
    def hook_switches(self, **switches: bool) -> Iterator[None]:
        """Temporarily set switches (e.g. `use_attn_result=True`); the previous settings come back on exit,
        also on an exception."""
        unknown = set(switches) - {*SETTERS, "use_eager_attention"}
        if unknown:
            raise ValueError(
                f"unknown switch(es) {sorted(unknown)}; known: {sorted({*SETTERS, 'use_eager_attention'})}."
            )
        before = [(cfg, {name: getattr(cfg, name) for name in switches}) for cfg in self._switch_cfgs()]
        try:
            for name, value in switches.items():
                getattr(self, SETTERS.get(name, "set_use_eager_attention"))(value)
            yield
        finally:
            for cfg, values in before:
                for name, value in values.items():
                    setattr(cfg, name, value)

    def hook_fires(self, name: str) -> bool:
        """False for a hook whose switch is off (it exists but does not fire)."""
        switch = next((s for suffix, s in SWITCHED.items() if name.endswith(suffix)), None)
        if switch is None:
            return True
        cfg = self.vision.cfg if name.startswith("vision.") and self.vision is not None else self.cfg
        return bool(getattr(cfg, switch))

    def check_hook_fires(self, name: str) -> None:
        """Raise a clear error when a hook named explicitly would never fire."""
        if not self.hook_fires(name):
            raise ValueError(self._off_message(name))

    def check_hooks_to_add(self, hook_point: Any, hook_point_name: str, hook: Any, **kwargs: Any) -> None:
        """As in TransformerLens, adding a hook whose switch is off raises `AssertionError`."""
        if not self.hook_fires(hook_point_name):
            raise AssertionError(self._off_message(hook_point_name))

    def _off_message(self, name: str) -> str:
        switch = next(s for suffix, s in SWITCHED.items() if name.endswith(suffix))
        return (
            f"{name} does not fire while cfg.{switch} is off (TransformerLens' default): "
            f"call model.{SETTERS[switch]}(True) first."
        )

    def _switch_cfgs(self) -> list[Any]:
        return [self.cfg] + ([self.vision.cfg] if self.vision is not None else [])

    def _set_switch(self, name: str, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
        for cfg in self._switch_cfgs():
            setattr(cfg, name, value)

    def get_caching_hooks(
        self,
        names_filter: Any = None,
        incl_bwd: bool = False,
        device: Any = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Any = None,
    ) -> tuple[dict, list, list]:
        """TransformerLens' caching hooks, except that `pos_slice` always slices the position
        dimension (see `pos_dim`; TransformerLens slices the head dimension of rotary q/k and of
        per-head inputs), and naming a hook whose switch is off raises instead of caching nothing
        (a filter function just leaves such hooks out). With `device` each activation is moved there
        as it is produced (so `device="cpu"` keeps accelerator memory near a plain forward's); a device
        that cannot hold the values (`"meta"`, or one this machine lacks) is refused before the forward."""
        names = self._filtered_names(names_filter)
        device = cache_device(device)
        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)

        def save(tensor: Tensor, hook: Any, is_backward: bool = False) -> None:
            value, dim = tensor.detach().to(device), pos_dim(hook.name)
            if dim is not None:
                value = pos_slice.apply(value, dim=dim)
                value = value[0] if remove_batch_dim and value.shape[0] == 1 else value
            cache[hook.name + ("_grad" if is_backward else "")] = value

        self.is_caching = True
        fwd = [(name, save) for name in names]
        bwd = [(name, _backward(save)) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def _filtered_names(self, names_filter: Any) -> list[str]:
        if names_filter is None:
            names_filter = lambda name: True  # noqa: E731
        if isinstance(names_filter, str) or isinstance(names_filter, list):
            explicit = [names_filter] if isinstance(names_filter, str) else names_filter
            for name in explicit:
                self.check_hook_fires(name)
            return [name for name in self.hook_dict if name in explicit]
        if callable(names_filter):  # hooks whose switch is off are left out, as they would not fire
            return [name for name in self.hook_dict if names_filter(name) and self.hook_fires(name)]
        raise ValueError("names_filter must be a string, a list of strings, or a function of the hook name.")


def cache_device(device: Any) -> torch.device | None:
    """`device` as a `torch.device` where cached activations can live, or None (keep them where they are)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={device!r} is not a torch device ({_first_line(err)}); use e.g. 'cpu' or 'cuda:0'."
        ) from None
    if dev.type == "meta":
        raise ValueError(
            "device='meta' would cache shapes without values; cache on 'cpu' or the model's device, "
            "or cache fewer hooks with names_filter."
        )
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(
            f"cannot cache on device {str(dev)!r}: it is not available here ({_first_line(err)})."
        ) from None
    return dev


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _backward(save: Callable[..., None]) -> Callable[[Tensor, Any], None]:
    return lambda tensor, hook: save(tensor, hook, is_backward=True)
