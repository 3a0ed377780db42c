"""The transcoder itself: `a = act(x W_encᵀ + b_enc)`, `ŷ = a W_dec + b_dec (+ x W_skipᵀ)`.

`SingleLayerTranscoder` holds one layer's weights in circuit-tracer's layout (`W_enc [d_tc, d_model]`,
`W_dec [d_tc, d_model]`, `b_enc [d_tc]`, `b_dec [d_model]`, optional `W_skip [d_model, d_model]`) with a
ReLU, JumpReLU(θ) or TopK(k) activation. `TranscoderSet` is the per-layer list with the hook-name
templates the features read from and write to.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class ReLU(nn.Module):
    """Plain ReLU (circuit-tracer's `activation: relu`)."""

    def forward(self, pre: Tensor) -> Tensor:
        return F.relu(pre)


class JumpReLU(nn.Module):
    """`pre * (pre > θ)` with one threshold per feature (`activation_function.threshold` on disk)."""

    def __init__(self, threshold: Tensor):
        super().__init__()
        self.threshold = nn.Parameter(threshold.clone())

    def forward(self, pre: Tensor) -> Tensor:
        return pre * (pre > self.threshold)


class TopK(nn.Module):
    """Keep the `k` largest pre-activations of each position (and only those > 0), zero the rest."""

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError(f"TopK needs k >= 1, got {k}.")
        self.k = int(k)

    def forward(self, pre: Tensor) -> Tensor:
        values, idx = pre.topk(min(self.k, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, F.relu(values))

    def extra_repr(self) -> str:
        return f"k={self.k}"


def activation_name(act: nn.Module) -> str:
    """circuit-tracer's name of an activation module: "relu", "jump_relu" or "topk"."""
    return {ReLU: "relu", JumpReLU: "jump_relu", TopK: "topk"}[type(act)]


class SingleLayerTranscoder(nn.Module):
    """One layer's transcoder.

    Args:
        d_model: width of the residual stream (input and output).
        d_transcoder: number of features.
        activation: a `ReLU`, `JumpReLU` or `TopK` module.
        layer: the layer whose MLP it replaces.
        skip_connection: add a linear skip `x W_skipᵀ` to the output.
    """

    def __init__(
        self, d_model: int, d_transcoder: int, activation: nn.Module, layer: int, skip_connection: bool = False
    ):
        super().__init__()
        self.d_model, self.d_transcoder, self.layer = d_model, d_transcoder, layer
        self.W_enc = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.W_dec = nn.Parameter(torch.zeros(d_transcoder, d_model))
        self.b_enc = nn.Parameter(torch.zeros(d_transcoder))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        self.W_skip = nn.Parameter(torch.zeros(d_model, d_model)) if skip_connection else None
        self.activation_function = activation

    def pre_activations(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_transcoder"]:
        """`x W_encᵀ + b_enc`, before the activation."""
        return F.linear(x.to(self.W_enc.dtype), self.W_enc, self.b_enc)

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_transcoder"]:
        """Feature activations of MLP inputs `x`."""
        return self.activation_function(self.pre_activations(x))

    def skip(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """The skip connection's output `x W_skipᵀ` (zeros without one)."""
        if self.W_skip is None:
            return torch.zeros(*x.shape[:-1], self.d_model, dtype=self.W_dec.dtype, device=self.W_dec.device)
        return x.to(self.W_skip.dtype) @ self.W_skip.T

    def decode(
        self, acts: Float[Tensor, "... d_transcoder"], x: Float[Tensor, "... d_model"] | None = None
    ) -> Float[Tensor, "... d_model"]:
        """The predicted MLP output `a W_dec + b_dec`, plus the skip term when `x` is given."""
        out = acts.to(self.W_dec.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: pass the MLP input x to decode(acts, x).")
            out = out + self.skip(x)
        return out

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.decode(self.encode(x), x)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, d_model={self.d_model}, d_transcoder={self.d_transcoder}"


class TranscoderSet(nn.Module):
    """One transcoder per layer, indexable (`ts[l]`), with the hook names they use.

    Args:
        transcoders: the transcoders of layers 0, 1, ..., n-1, in order.
        feature_input_hook: template of the hook the features read, with a `{layer}` field; or, for a
            set whose layers sit at unlike hooks (the vision MLPs, then the projector), one full hook
            name per layer.
        feature_output_hook: template of the hook whose value they predict (or one name per layer).
        scan: an identifier of the set (circuit-tracer's `scan`).
    """

    def __init__(
        self,
        transcoders: Sequence[SingleLayerTranscoder],
        feature_input_hook: str | Sequence[str] = "blocks.{layer}.ln2.hook_normalized",
        feature_output_hook: str | Sequence[str] = "blocks.{layer}.hook_mlp_out",
        scan: str | None = None,
    ):
        super().__init__()
        if [t.layer for t in transcoders] != list(range(len(transcoders))):
            raise ValueError(
                f"need one transcoder per layer 0..n-1 in order; got layers {[t.layer for t in transcoders]}"
            )
        hooks = []
        for name in (feature_input_hook, feature_output_hook):
            if isinstance(name, str) and "{layer}" not in name:
                raise ValueError(
                    f"hook template {name!r} has no {{layer}} field, e.g. 'blocks.{{layer}}.hook_mlp_out' "
                    "(or give a list with one hook name per layer)."
                )
            if not isinstance(name, str) and len(name) != len(transcoders):
                raise ValueError(f"{len(name)} hook names for {len(transcoders)} layers; give one per layer.")
            hooks.append(name if isinstance(name, str) else list(name))
        self.transcoders = nn.ModuleList(transcoders)
        self.feature_input_hook, self.feature_output_hook = hooks
        self.scan = scan

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> SingleLayerTranscoder:
        return self.transcoders[layer]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[SingleLayerTranscoder]:
        return iter(self.transcoders)  # type: ignore[arg-type]

    @property
    def d_transcoder(self) -> int:
        return self[0].d_transcoder

    @property
    def skip_connection(self) -> bool:
        return self[0].W_skip is not None

    def input_hook(self, layer: int) -> str:
        """The hook layer `layer`'s features read, e.g. `blocks.3.ln2.hook_normalized`."""
        return _hook_name(self.feature_input_hook, layer)

    def output_hook(self, layer: int) -> str:
        """The hook whose value layer `layer`'s transcoder predicts, e.g. `blocks.3.hook_mlp_out`."""
        return _hook_name(self.feature_output_hook, layer)


def _hook_name(hooks: str | list[str], layer: int) -> str:
    """Layer `layer`'s hook: the template filled in, or the list's entry."""
    return hooks.format(layer=layer) if isinstance(hooks, str) else hooks[layer]
