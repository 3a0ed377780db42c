"""The local replacement model continued through the projector and the vision tower.

On top of the language model's replacement model (`replacement.py`), every vision block's MLP and the
projector are replaced by their transcoders (`vision_ts`: one layer per vision MLP, then the projector;
see `hooked_llava.transcoders.train.vision_hooks`), each with its error term, and every vision norm's
scale (`ln_pre`, `ln1`, `ln2`) and attention pattern is frozen, as the language model's are. Then the
model is linear from these nodes to every target:

- pixel inputs: what enters the tower at each vision position (`vision.hook_embed`: the patch conv of
  the patch's pixels plus its position embedding; at position 0, CLS, the class embedding plus its
  position embedding — CLS is an input node of its own, not folded into the constants);
- vision features (stage, vpos, feature) and vision errors (stage, vpos); a *stage* is a vision MLP or
  the projector (the last stage), and `vpos` is the tower's position (the projector's patch `j` is at
  `vpos = 1 + j`, since the tower's CLS is dropped before the projector);
- the language model's features, errors and text-token embeddings. At image positions the merged
  embedding is the projector's (replaced) output, so the token nodes there carry nothing.

What is left are the constants (biases): transcoders' `b_dec`, attention and LayerNorm biases.
Features at CLS are kept (CLS is no attention sink to be dropped as the language model's BOS is).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from analyses.graphs.replacement import (
    CleanRun,
    FrozenModel,
    _decoder_vectors,
    _detach,
    _replace,
    _store,
    padded_decoders,
)


@dataclass
class VisionCleanRun:
    """The vision side of one prompt's clean run (row 0; one image)."""

    embed: Float[Tensor, "vpos d_vision"]  # `vision.hook_embed`: the pixel input nodes' vectors
    mlp_in: list[Tensor]  # per stage [stage_pos, d_in]
    mlp_out: list[Tensor]  # per stage [stage_pos, d_out]
    offsets: list[int]  # per stage, the vision position of its position 0 (1 for the projector, 0 else)
    active: Int[Tensor, "nnz 3"]  # (stage, vpos, feature), sorted
    values: Float[Tensor, " nnz"]
    errors: list[Tensor]  # per stage [stage_pos, d_out]
    pre_activations: Float[Tensor, " nnz"]  # `x W_encᵀ + b_enc` of the active features


def check_vision_model(model: Any, vision_ts: Any) -> None:
    """Refuse, with what to do instead, a model or a set the through-vision graph does not cover."""
    if model.vision is None or model.projector is None:
        raise ValueError("this model has no vision tower; use analyses.graphs.attribute.")
    cfg = model.vision.cfg
    if cfg.tower != "clip" or cfg.select_strategy != "default" or len(cfg.feature_layers) != 1:
        raise ValueError(
            "graphs through the vision tower need a CLIP tower with a CLS position dropped before the projector "
            f"(select_strategy 'default') and one feature layer; this one is {cfg.tower!r}, "
            f"{cfg.select_strategy!r}, layers {cfg.feature_layers}."
        )
    if model.cfgs.pinpoints is not None:
        raise ValueError("graphs through the vision tower support LLaVA-1.5 packing only (one view, no NeXT tiles).")
    n = cfg.n_layers_computed
    if len(vision_ts) != n + 1:
        raise ValueError(f"vision_ts has {len(vision_ts)} layers; need {n} vision MLPs and then the projector.")
    want = [f"vision.blocks.{i}.hook_mlp_out" for i in range(n)] + ["projector.hook_out"]
    got = [vision_ts.output_hook(i) for i in range(len(vision_ts))]
    if got != want:
        raise ValueError(f"vision_ts's output hooks are {got}; need {want} (see transcoders.train.vision_hooks).")


@torch.no_grad()
def vision_clean_run(model: Any, inputs: Any, vision_ts: Any) -> VisionCleanRun:
    """The vision tower's clean run on row 0's image: inputs, outputs, active features and errors per stage."""
    one = inputs[0:1]
    if one.pixel_values is None or one.pixel_values.shape[0] != 1:
        raise ValueError("a through-vision graph needs exactly one image in row 0 of the inputs.")
    n = len(vision_ts)
    names = ["vision.hook_embed", *(vision_ts.input_hook(s) for s in range(n))]
    names += [vision_ts.output_hook(s) for s in range(n)]
    with model.hook_switches(use_eager_attention=True):
        _, cache = model.run_with_cache(one, names_filter=names, stop_at_layer=0)
    mlp_in = [cache[vision_ts.input_hook(s)][0].float() for s in range(n)]
    mlp_out = [cache[vision_ts.output_hook(s)][0].float() for s in range(n)]
    embed = cache["vision.hook_embed"][0].float()
    offsets = [len(embed) - len(x) for x in mlp_in]
    active, values, errors, pre = [], [], [], []
    for s, tc in enumerate(vision_ts):
        acts = tc.encode(mlp_in[s])
        errors.append(mlp_out[s] - tc.decode(acts, mlp_in[s]))
        nz = acts.nonzero()
        active.append(torch.stack([torch.full_like(nz[:, 0], s), nz[:, 0] + offsets[s], nz[:, 1]], 1))
        values.append(acts[nz[:, 0], nz[:, 1]])
        pre.append(tc.pre_activations(mlp_in[s])[nz[:, 0], nz[:, 1]])
    return VisionCleanRun(embed, mlp_in, mlp_out, offsets, torch.cat(active), torch.cat(values), errors, torch.cat(pre))


def _merge(x: Tensor, hook: Any, *, tokens: Tensor, image: Tensor) -> Tensor:
    """`hook_embed`: the projected patches (from the graph) at image positions, the token leaf elsewhere."""
    return torch.where(image, x, tokens.to(x.dtype))


class ThroughVisionModel(FrozenModel):
    """The replacement model through the vision tower, run on `batch_size` copies of the prompt.

    Columns of `rows`: `[LM features, vision features, LM errors (layer, pos), vision errors (stage, vpos),
    tokens (pos), pixel inputs (vpos)]`.
    """

    def __init__(
        self, model: Any, inputs: Any, ts: Any, vision_ts: Any, clean: CleanRun, vclean: VisionCleanRun, b: int
    ):
        self.model, self.ts, self.clean, self.n_layers = model, ts, clean, len(ts)
        self.vts, self.vclean, self.n_stages = vision_ts, vclean, len(vision_ts)
        self.embed = clean.embed.expand(b, -1, -1).clone().requires_grad_(True)  # text tokens (image: unused)
        skip = [ts[layer].skip(clean.mlp_in[layer]) for layer in range(self.n_layers)]
        self.mlp = [(out - s).expand(b, -1, -1).clone().requires_grad_(True) for out, s in zip(clean.mlp_out, skip)]
        self.vembed = vclean.embed.expand(b, -1, -1).clone().requires_grad_(True)
        vskip = [vision_ts[s].skip(vclean.mlp_in[s]) for s in range(self.n_stages)]
        self.vmlp = [(o - k).expand(b, -1, -1).clone().requires_grad_(True) for o, k in zip(vclean.mlp_out, vskip)]
        self.mlp_in: dict[str, Tensor] = {}
        self.decoders = [_decoder_vectors(clean, ts, layer) for layer in range(self.n_layers)]
        self.vdecoders = []
        for s in range(self.n_stages):
            sel = vclean.active[:, 0] == s
            pos, f = vclean.active[sel, 1] - vclean.offsets[s], vclean.active[sel, 2]
            self.vdecoders.append(
                padded_decoders(pos, f, vclean.values[sel], vision_ts[s].W_dec, len(vclean.mlp_in[s]))
            )
        batch = inputs[[0] * b]
        hooks = self._language_hooks() + self._vision_hooks()
        image = batch.image_mask[..., None].to(self.embed.device)
        hooks.append(("hook_embed", partial(_merge, tokens=self.embed, image=image)))
        with torch.enable_grad(), model.hook_switches(use_eager_attention=True), model.hooks(fwd_hooks=hooks):
            logits = model(batch)
        last = logits[:, int(inputs.last[0])].float()
        self.logit_reading = last - last.mean(-1, keepdim=True)

    def _language_hooks(self) -> list[tuple[str, Any]]:
        hooks = []
        for layer in range(self.n_layers):
            block = f"blocks.{layer}."
            hooks += [(block + "ln1.hook_scale", _detach), (block + "ln2.hook_scale", _detach)]
            hooks += [(block + "attn.hook_pattern", _detach)]
            hooks.append((self.ts.input_hook(layer), partial(_store, into=self.mlp_in)))
            hooks.append((self.ts.output_hook(layer), partial(self._mlp_out, layer=layer)))
        return hooks + [("ln_final.hook_scale", _detach)]

    def _vision_hooks(self) -> list[tuple[str, Any]]:
        hooks: list[tuple[str, Any]] = [("vision.hook_embed", partial(_replace, value=self.vembed))]
        hooks.append(("vision.ln_pre.hook_scale", _detach))
        for layer in range(self.model.vision.cfg.n_layers_computed):
            block = f"vision.blocks.{layer}."
            hooks += [(block + "ln1.hook_scale", _detach), (block + "ln2.hook_scale", _detach)]
            hooks.append((block + "attn.hook_pattern", _detach))
        for s in range(self.n_stages):
            hooks.append((self.vts.input_hook(s), partial(_store, into=self.mlp_in)))
            hooks.append((self.vts.output_hook(s), partial(self._stage_out, stage=s)))
        return hooks

    def _stage_out(self, out: Tensor, hook: Any, stage: int) -> Tensor:
        x = self.mlp_in[self.vts.input_hook(stage)]
        return (self.vmlp[stage] + self.vts[stage].skip(x)).to(out.dtype)  # value: the clean output

    def readings(self, chunk: Tensor) -> Tensor:
        """Batch row `i`'s reading of feature `chunk[i]` (an index into `[LM active, vision active]`)."""
        n_lm, out = len(self.clean.active), []
        for i, idx in enumerate(chunk.tolist()):
            if idx < n_lm:
                layer, pos, f = self.clean.active[idx].tolist()
                x, w = self.mlp_in[self.ts.input_hook(layer)][i, pos], self.ts[layer].W_enc[f]
            else:
                s, vpos, f = self.vclean.active[idx - n_lm].tolist()
                x = self.mlp_in[self.vts.input_hook(s)][i, vpos - self.vclean.offsets[s]]
                w = self.vts[s].W_enc[f]
            out.append((x.float() * w.float()).sum())
        return torch.stack(out)

    def rows(self, readings: Tensor) -> Float[Tensor, "n n_sources"]:
        """Edges into the targets whose readings (one per batch row, in order) are given, from every source."""
        n, c, v = len(readings), self.clean, self.vclean
        leaves = [self.embed, *self.mlp, self.vembed, *self.vmlp]
        grads = torch.autograd.grad(readings.sum(), leaves, retain_graph=True, allow_unused=True)
        grads = [(torch.zeros_like(leaf) if g is None else g)[:n].float() for g, leaf in zip(grads, leaves)]
        g_embed, g_mlp = grads[0], grads[1 : 1 + self.n_layers]
        g_vembed, g_vmlp = grads[1 + self.n_layers], grads[2 + self.n_layers :]

        def features(g: list[Tensor], decoders: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
            return [torch.einsum("bpd,pkd->bpk", gl, vec).flatten(1)[:, slots] for gl, (vec, slots) in zip(g, decoders)]

        errors = [torch.einsum("bpd,pd->bp", g_mlp[layer], c.errors[layer]) for layer in range(self.n_layers)]
        verrors = torch.zeros(n, self.n_stages, len(v.embed), device=readings.device)
        for s in range(self.n_stages):
            verrors[:, s, v.offsets[s] :] = torch.einsum("bpd,pd->bp", g_vmlp[s], v.errors[s])
        tokens = torch.einsum("bpd,pd->bp", g_embed, c.embed)
        pixels = torch.einsum("bpd,pd->bp", g_vembed, v.embed)
        columns = [*features(g_mlp, self.decoders), *features(g_vmlp, self.vdecoders), *errors]
        return torch.cat([*columns, verrors.flatten(1), tokens, pixels], 1).detach()
