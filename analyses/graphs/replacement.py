"""The local replacement model of one prompt: the clean run, and edges by backward passes.

`clean_run` runs the model once and records what the graph needs: the merged embeddings
(`hook_embed`), each layer's MLP input and output at the transcoders' hooks, the feature activations
(features at position 0, the BOS attention sink, are zeroed as circuit-tracer does; their output joins
the error), and the error terms `e_l = mlp_out_l − ŷ_l`.

`FrozenModel` is the replacement model made linear (METHODS §5): a batched forward where every norm's
scale and every attention pattern is detached, the embeddings and each MLP's output are leaves holding
their clean values (so no gradient runs through an MLP; a transcoder's skip connection stays linear in
its input). The gradient of a target's input reading (a feature's encoder row at its layer's MLP input,
or a logit vector after the final norm) at those leaves, dotted with each source's output vector (a
feature's `a·W_dec` row, an error, an embedding), is the edge `A[target, source]`. Each batch row carries
one target, so one backward pass gives `batch_size` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass
class CleanRun:
    """What one prompt's clean run leaves for the graph (all on the model's device, row 0 of the inputs)."""

    logits: Float[Tensor, " d_vocab"]  # at the last position
    embed: Float[Tensor, "pos d_model"]
    mlp_in: list[Tensor]  # per layer [pos, d_model], at the transcoders' input hook
    mlp_out: list[Tensor]  # per layer [pos, d_model]
    active: Int[Tensor, "nnz 3"]  # (layer, pos, feature), sorted
    values: Float[Tensor, " nnz"]
    errors: Float[Tensor, "layer pos d_model"]
    pre_activations: Float[Tensor, " nnz"]  # `x W_encᵀ + b_enc` of the active features


def _detach(x: Tensor, hook: Any) -> Tensor:
    return x.detach()


def _store(x: Tensor, hook: Any, *, into: dict[str, Tensor]) -> Tensor:
    into[hook.name] = x
    return x


def _replace(x: Tensor, hook: Any, *, value: Tensor) -> Tensor:
    return value


@torch.no_grad()
def clean_run(model: Any, inputs: Any, ts: Any, zero_bos: bool = True) -> CleanRun:
    """Run the model on row 0 of `inputs` and compute the transcoders' activations and error terms."""
    n = len(ts)
    names = [
        "hook_embed",
        *(ts.input_hook(layer) for layer in range(n)),
        *(ts.output_hook(layer) for layer in range(n)),
    ]
    with model.hook_switches(use_eager_attention=True):
        logits, cache = model.run_with_cache(inputs[0:1], names_filter=names)
    mlp_in = [cache[ts.input_hook(layer)][0].float() for layer in range(n)]
    mlp_out = [cache[ts.output_hook(layer)][0].float() for layer in range(n)]
    active, values, pre, errors = [], [], [], []
    for layer, tc in enumerate(ts):
        acts = tc.encode(mlp_in[layer])
        if zero_bos:
            acts[0] = 0
        errors.append(mlp_out[layer] - tc.decode(acts, mlp_in[layer]))
        nz = acts.nonzero()
        active.append(torch.cat([torch.full_like(nz[:, :1], layer), nz], 1))
        values.append(acts[nz[:, 0], nz[:, 1]])
        pre.append(tc.pre_activations(mlp_in[layer])[nz[:, 0], nz[:, 1]])
    return CleanRun(
        logits[0, int(inputs.last[0])].float(),
        cache["hook_embed"][0].float(),
        mlp_in,
        mlp_out,
        torch.cat(active),
        torch.cat(values),
        torch.stack(errors),
        torch.cat(pre),
    )


def _decoder_vectors(clean: CleanRun, ts: Any, layer: int) -> tuple[Tensor, Tensor]:
    """A layer's active features' output vectors `a·W_dec`, padded to `[pos, k_max, d]` by position, and
    where each feature (in `clean.active` order) sits in the flattened `[pos * k_max]` layout."""
    sel = clean.active[:, 0] == layer
    return padded_decoders(
        clean.active[sel, 1], clean.active[sel, 2], clean.values[sel], ts[layer].W_dec, len(clean.embed)
    )


def padded_decoders(pos: Tensor, f: Tensor, values: Tensor, W_dec: Tensor, n_pos: int) -> tuple[Tensor, Tensor]:
    """Active features' output vectors `a·W_dec` (features `f` at positions `pos`, sorted by position), padded
    to `[n_pos, k_max, d]`, and where each sits in the flattened `[n_pos * k_max]` layout."""
    counts = torch.bincount(pos, minlength=n_pos)
    k_max = max(int(counts.max()) if len(pos) else 0, 1)
    slot = torch.arange(len(pos), device=pos.device) - (counts.cumsum(0) - counts)[pos]  # rank within its position
    vectors = torch.zeros(n_pos, k_max, W_dec.shape[1], device=pos.device)
    vectors[pos, slot] = W_dec[f].float() * values[:, None]
    return vectors.detach(), pos * k_max + slot


class FrozenModel:
    """The replacement model run on `batch_size` copies of the prompt, ready for backward passes."""

    def __init__(self, model: Any, inputs: Any, ts: Any, clean: CleanRun, batch_size: int):
        self.model, self.ts, self.clean, self.n_layers = model, ts, clean, len(ts)
        b = batch_size
        self.embed = clean.embed.expand(b, -1, -1).clone().requires_grad_(True)
        skip = [ts[layer].skip(clean.mlp_in[layer]) for layer in range(self.n_layers)]
        self.mlp = [(out - s).expand(b, -1, -1).clone().requires_grad_(True) for out, s in zip(clean.mlp_out, skip)]
        self.mlp_in: dict[str, Tensor] = {}
        self.decoders = [_decoder_vectors(clean, ts, layer) for layer in range(self.n_layers)]
        hooks = []
        for layer in range(self.n_layers):
            block = f"blocks.{layer}."
            hooks += [(block + "ln1.hook_scale", _detach), (block + "ln2.hook_scale", _detach)]
            hooks += [(block + "attn.hook_pattern", _detach), (ts.input_hook(layer), partial(_store, into=self.mlp_in))]
            hooks.append((ts.output_hook(layer), partial(self._mlp_out, layer=layer)))
        hooks.append(("ln_final.hook_scale", _detach))
        batch = inputs[[0] * b]
        with torch.enable_grad(), model.hook_switches(use_eager_attention=True), model.hooks(fwd_hooks=hooks):
            logits = model(batch, start_at_layer=0, residual=self.embed)
        last = logits[:, int(inputs.last[0])].float()
        self.logit_reading = last - last.mean(-1, keepdim=True)  # [batch, vocab]: `W_U[:, t] − mean_j W_U[:, j]`

    def _mlp_out(self, out: Tensor, hook: Any, layer: int) -> Tensor:
        x = self.mlp_in[self.ts.input_hook(layer)]
        return (self.mlp[layer] + self.ts[layer].skip(x)).to(out.dtype)  # value: the clean MLP output

    def feature_readings(self, layers: Tensor, positions: Tensor, features: Tensor) -> Tensor:
        """Batch row `i`'s reading of target feature `i`: `W_enc[f_i] · x_{l_i}[i, p_i]`."""
        x = torch.stack([self.mlp_in[self.ts.input_hook(layer)] for layer in range(self.n_layers)])
        rows = torch.arange(len(layers), device=x.device)
        enc = torch.stack([self.ts[int(layer)].W_enc[int(f)] for layer, f in zip(layers, features)])
        return (x[layers, rows, positions].float() * enc.float()).sum(-1)

    def rows(self, readings: Tensor) -> Float[Tensor, "n n_sources"]:
        """Edges into the targets whose readings (one per batch row, in order) are given, from every source:
        columns `[active features, errors (layer, pos), tokens (pos)]`."""
        n = len(readings)
        leaves = [self.embed, *self.mlp]
        grads = torch.autograd.grad(readings.sum(), leaves, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
        g_embed, g_mlp = grads[0][:n], [g[:n] for g in grads[1:]]
        feats = [
            torch.einsum("bpd,pkd->bpk", g_mlp[layer].float(), vectors).flatten(1)[:, slots]
            for layer, (vectors, slots) in enumerate(self.decoders)
        ]
        c = self.clean
        errors = [torch.einsum("bpd,pd->bp", g_mlp[layer].float(), c.errors[layer]) for layer in range(self.n_layers)]
        tokens = torch.einsum("bpd,pd->bp", g_embed.float(), c.embed)
        return torch.cat([*feats, *errors, tokens], 1).detach()
