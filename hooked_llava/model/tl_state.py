"""TransformerLens names and layouts in the language model's `state_dict`.

Parameters are stored as HF stores them (`F.linear` layout), so the forward pass matches HF with no
per-call copies. Hooks registered here make `state_dict()` present the language model as
TransformerLens' `HookedTransformer` does (`blocks.0.attn.W_Q [n_heads, d_model, d_head]`,
`blocks.0.mlp.W_in [d_model, d_mlp]`, `unembed.W_U [d_model, d_vocab]`, ...), with grouped-query
keys and values as `_W_K`/`_W_V`/`_b_K`/`_b_V` `[n_kv_heads, ...]` like TL's `GroupedQueryAttention`,
and absent biases as zeros. The tensors are views of the parameters (no copies; call `.contiguous()`
before saving with safetensors).

`load_state_dict` takes either spelling: TL names are converted back to the stored layout, an absent
bias may be loaded only as zeros (anything else is an error, as a size mismatch is), and missing keys
are reported under their TL names. The vision tower and projector keep their own names under
`vision.` and `projector.`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import Tensor, nn


@dataclass(frozen=True)
class Spec:
    """One stored parameter `ours` shown as `tl` with shape `shape`; `to_tl`/`from_tl` convert layouts."""

    ours: str
    tl: str
    shape: tuple[int, ...]
    to_tl: Callable[[Tensor], Tensor]
    from_tl: Callable[[Tensor], Tensor]
    zeros_when_absent: bool = True
    aliases: tuple[str, ...] = ()


def _same(t: Tensor) -> Tensor:
    return t


def _t(t: Tensor) -> Tensor:
    return t.T


def _heads_to_tl(w: Tensor, h: int, d_head: int) -> Tensor:  # [h * d_head, d_model] -> [h, d_model, d_head]
    return w.view(h, d_head, -1).transpose(1, 2)


def _heads_from_tl(w: Tensor) -> Tensor:
    return w.transpose(1, 2).reshape(-1, w.shape[1])


def _out_to_tl(w: Tensor, h: int, d_head: int) -> Tensor:  # [d_model, h * d_head] -> [h, d_head, d_model]
    return w.view(-1, h, d_head).permute(1, 2, 0)


def _out_from_tl(w: Tensor) -> Tensor:
    return w.permute(2, 0, 1).reshape(w.shape[2], -1)


def _bias_to_tl(b: Tensor, h: int) -> Tensor:
    return b.view(h, -1)


def _flat(b: Tensor) -> Tensor:
    return b.reshape(-1)


def attention_specs(n: int, kv: int, d_head: int, d_model: int) -> list[Spec]:
    """`W_Q [n, d_model, d_head]`, `W_K`/`W_V` (`_W_K`/`_W_V` when grouped), `W_O [n, d_head, d_model]`, biases."""
    g = "_" if kv != n else ""  # TransformerLens' GroupedQueryAttention stores the unexpanded K, V as `_W_K`
    other = "" if g else "_"  # loading accepts the other spelling too
    specs = [
        Spec("w_q", "W_Q", (n, d_model, d_head), partial(_heads_to_tl, h=n, d_head=d_head), _heads_from_tl),
        Spec("b_q", "b_Q", (n, d_head), partial(_bias_to_tl, h=n), _flat),
    ]
    for x in ("K", "V"):
        w_to, b_to = partial(_heads_to_tl, h=kv, d_head=d_head), partial(_bias_to_tl, h=kv)
        w, b = f"w_{x.lower()}", f"b_{x.lower()}"
        specs.append(Spec(w, f"{g}W_{x}", (kv, d_model, d_head), w_to, _heads_from_tl, aliases=(f"{other}W_{x}",)))
        specs.append(Spec(b, f"{g}b_{x}", (kv, d_head), b_to, _flat, aliases=(f"{other}b_{x}",)))
    specs.append(Spec("w_o", "W_O", (n, d_head, d_model), partial(_out_to_tl, h=n, d_head=d_head), _out_from_tl))
    specs.append(Spec("b_o", "b_O", (d_model,), _same, _same))
    return specs


def gated_mlp_specs(d_model: int, d_mlp: int) -> list[Spec]:
    """`W_in`/`W_gate [d_model, d_mlp]`, `W_out [d_mlp, d_model]`, `b_in`, `b_out` (TL has no `b_gate`)."""
    return [
        Spec("w_in", "W_in", (d_model, d_mlp), _t, _t),
        Spec("w_gate", "W_gate", (d_model, d_mlp), _t, _t),
        Spec("w_out", "W_out", (d_mlp, d_model), _t, _t),
        Spec("bias_in", "b_in", (d_mlp,), _same, _same),
        Spec("bias_gate", "b_gate", (d_mlp,), _same, _same, zeros_when_absent=False),
        Spec("bias_out", "b_out", (d_model,), _same, _same),
    ]


def unembed_specs(d_model: int, d_vocab: int) -> list[Spec]:
    """`W_U [d_model, d_vocab]` and `b_U` (zeros: LLaVA's head has no bias)."""
    return [Spec("w_u", "W_U", (d_model, d_vocab), _t, _t), Spec("b_u", "b_U", (d_vocab,), _same, _same)]


def register(module: nn.Module, specs: list[Spec]) -> None:
    """Show `module`'s parameters under TL names in `state_dict()` and accept them in `load_state_dict`."""
    module.register_state_dict_post_hook(partial(_save, specs=specs))
    module.register_load_state_dict_pre_hook(partial(_load, specs=specs))
    module.register_load_state_dict_post_hook(partial(_rename_missing, specs=specs))


def _save(module: nn.Module, sd: dict[str, Tensor], prefix: str, meta: Any, *, specs: list[Spec]) -> None:
    like = next(p for p in module.parameters(recurse=False) if p is not None)
    for s in specs:
        if prefix + s.ours in sd:
            sd[prefix + s.tl] = s.to_tl(sd.pop(prefix + s.ours))
        elif s.zeros_when_absent:
            sd[prefix + s.tl] = like.detach().new_zeros(s.shape)


def _load(module: nn.Module, sd: dict[str, Any], prefix: str, *rest: Any, specs: list[Spec]) -> None:
    errors: list[str] = rest[-1]  # after local_metadata, strict, missing_keys, unexpected_keys
    module._tl_load_prefix = prefix  # type: ignore[assignment]  # read by `_rename_missing`
    for s in specs:
        present = [prefix + name for name in (s.tl, *s.aliases, s.ours) if prefix + name in sd]
        if len(present) > 1:
            errors.append(f"{' and '.join(present)} are the same parameter: give one of them.")
            continue
        if not present or present[0] == prefix + s.ours:
            continue
        key = present[0]
        t = sd.pop(key)
        if tuple(t.shape) != s.shape:
            errors.append(
                f"size mismatch for {key}: copying a param with shape {tuple(t.shape)} from checkpoint, "
                f"the shape in current model is {s.shape}."
            )
        elif getattr(module, s.ours, None) is not None:
            sd[prefix + s.ours] = s.from_tl(t)
        elif t.device.type != "meta" and bool(t.ne(0).any()):
            errors.append(
                f"{key} is nonzero, but this model has no such bias (its config has none); "
                "only zeros can be loaded into it."
            )


def _rename_missing(module: nn.Module, keys: Any, *, specs: list[Spec]) -> None:
    missing: list[str] = keys.missing_keys
    prefix = getattr(module, "_tl_load_prefix", None)
    if prefix is None:
        return
    names = {prefix + s.ours: prefix + s.tl for s in specs}
    missing[:] = [names.get(k, k) for k in missing]
