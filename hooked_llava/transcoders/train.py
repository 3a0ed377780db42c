"""Train a per-layer transcoder for every language-model MLP (or every vision MLP and the projector)
on Shapes-world questions.

Activations stream through the model's hooks (`LayerPairs`, built on the SAE trainer's
`ShapesActivations`): batch `k` holds, for `batch_size` positions drawn from the questions of batch
`k` (all categories, image and text positions), the MLP input and output of every layer. With
`--tower vision` the layers are the vision tower's MLPs (`vision.blocks.{layer}.ln2.hook_normalized` →
`vision.blocks.{layer}.hook_mlp_out`, every vision position, CLS included) and then the projector
(`projector.hook_in` → `projector.hook_out`, every patch); each layer's rows are then drawn from its own
positions, since the projector has no CLS position. Batch `k`
is a pure function of `(seed, k)`, the weights start from `seed`, and the state is checkpointed, so an
interrupted run resumes exactly where it stopped. All layers train together (stacked weights), each
on its own reconstruction loss, normalised by its output's variance.

    python -m hooked_llava.transcoders.train --model shapes-llava --out DIR --samples 4000000
    python -m hooked_llava.transcoders.train --tower vision --out DIR --samples 2000000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from hooked_llava.saes.training import ShapesActivations
from hooked_llava.transcoders.io import save_transcoders
from hooked_llava.transcoders.transcoder import SingleLayerTranscoder, TopK, TranscoderSet

INPUT_HOOK, OUTPUT_HOOK = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"
VISION_INPUT_HOOK, VISION_OUTPUT_HOOK = (
    "vision.blocks.{layer}.ln2.hook_normalized",
    "vision.blocks.{layer}.hook_mlp_out",
)


def vision_hooks(model: Any) -> tuple[list[str], list[str]]:
    """The input and output hooks of every computed vision MLP, then of the projector (one per layer)."""
    if model.vision is None or model.projector is None:
        raise ValueError("this model has no vision tower and projector; train language-model transcoders instead.")
    layers = range(model.vision.cfg.n_layers_computed)
    inputs = [VISION_INPUT_HOOK.format(layer=layer) for layer in layers] + ["projector.hook_in"]
    outputs = [VISION_OUTPUT_HOOK.format(layer=layer) for layer in layers] + ["projector.hook_out"]
    return inputs, outputs


def _names(hooks: str | Sequence[str], n: int) -> list[str]:
    return [hooks.format(layer=layer) for layer in range(n)] if isinstance(hooks, str) else list(hooks)


class LayerPairs(ShapesActivations):
    """Batches `[batch, n_layers, 2, d_model]` of (MLP input, MLP output) at every layer.

    Language-model hooks give every layer's pair at the same positions (the chosen roles). Vision and
    projector hooks (`[n_images, positions, d]`) give each layer's pairs at its own positions: every
    position of every image, shuffled (a fixed seed) and cut to the shortest layer's count.
    """

    def __init__(
        self,
        model: Any,
        input_hook: str | Sequence[str] = INPUT_HOOK,
        output_hook: str | Sequence[str] = OUTPUT_HOOK,
        **kw: Any,
    ):
        n = model.cfg.n_layers if isinstance(input_hook, str) else len(input_hook)
        ins, outs = _names(input_hook, n), _names(output_hook, n)
        if len(ins) != len(outs):
            raise ValueError(f"{len(ins)} input hooks but {len(outs)} output hooks; give one pair per layer.")
        self.names = [name for pair in zip(ins, outs) for name in pair]
        missing = [name for name in self.names if name not in model.hook_dict]
        if missing:
            raise KeyError(f"unknown hooks {missing[:2]}...; the templates need a {{layer}} field and real hook names.")
        super().__init__(model, outs[-1], **kw)

    @torch.no_grad()
    def activations(self, examples: Sequence[Any]) -> Float[Tensor, "n layer 2 d_model"]:
        inputs = self.model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
        _, cache = self.model.run_with_cache(inputs, names_filter=self.names, stop_at_layer=self._stop)
        if any(cache[name].shape[:2] != inputs.input_ids.shape for name in self.names):
            return self._per_layer_rows([cache[name] for name in self.names])
        acts = torch.stack([cache[name] for name in self.names], 2)  # [batch, pos, 2 * layers, d]
        acts = acts[self.role_mask(inputs).to(acts.device)]
        return acts.unflatten(1, (len(self.names) // 2, 2))

    @staticmethod
    def _per_layer_rows(acts: list[Tensor]) -> Float[Tensor, "n layer 2 d_model"]:
        """Each layer's (input, output) rows at all its positions, shuffled and cut to a common count."""
        pairs = [torch.stack([x.flatten(0, -2), y.flatten(0, -2)], 1) for x, y in zip(acts[::2], acts[1::2])]
        n = min(len(p) for p in pairs)
        gen = torch.Generator().manual_seed(0)
        return torch.stack([p[torch.randperm(len(p), generator=gen)[:n].to(p.device)] for p in pairs], 1)


class StackedTranscoders(nn.Module):
    """All layers' TopK transcoders as stacked weights `[layer, ...]`, trained at once."""

    def __init__(self, n_layers: int, d_model: int, d_transcoder: int, k: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        enc = torch.randn(n_layers, d_transcoder, d_model, generator=gen)
        self.W_enc = nn.Parameter(enc / enc.norm(dim=-1, keepdim=True))
        dec = torch.randn(n_layers, d_transcoder, d_model, generator=gen)
        self.W_dec = nn.Parameter(0.1 * dec / dec.norm(dim=-1, keepdim=True))
        self.b_enc = nn.Parameter(torch.zeros(n_layers, d_transcoder))
        self.b_dec = nn.Parameter(torch.zeros(n_layers, d_model))
        self.act = TopK(k)

    def forward(self, x: Float[Tensor, "batch layer d"]) -> tuple[Tensor, Tensor]:
        acts = self.act(torch.einsum("bld,lfd->blf", x, self.W_enc) + self.b_enc)
        return acts, torch.einsum("blf,lfd->bld", acts, self.W_dec) + self.b_dec

    def to_set(
        self,
        input_hook: str | Sequence[str] = INPUT_HOOK,
        output_hook: str | Sequence[str] = OUTPUT_HOOK,
        scan: str | None = None,
    ) -> TranscoderSet:
        """The per-layer `TranscoderSet` with these weights."""
        n, f, d = self.W_enc.shape
        layers = []
        for layer in range(n):
            tc = SingleLayerTranscoder(d, f, TopK(self.act.k), layer)
            tc.load_state_dict(
                {k: getattr(self, k)[layer].detach().clone() for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
            )
            layers.append(tc)
        return TranscoderSet(layers, input_hook, output_hook, scan)


def _lr_factor(step: int, steps: int) -> float:
    """Linear warm-up over the first 5 % of steps, constant, then linear decay to 10 % over the last 20 %."""
    warm, decay = max(steps // 20, 1), max(steps // 5, 1)
    if step < warm:
        return (step + 1) / warm
    return max(0.1, min(1.0, (steps - step) / decay))


def train_transcoders(
    model: Any,
    out: str | Path,
    *,
    d_transcoder: int = 1024,
    k: int = 16,
    total_samples: int = 2**22,
    batch_size: int = 2048,
    lr: float = 1e-3,
    seed: int = 0,
    examples_per_batch: int = 32,
    checkpoint_every: int = 100,
    scan: str | None = None,
    input_hook: str | Sequence[str] = INPUT_HOOK,
    output_hook: str | Sequence[str] = OUTPUT_HOOK,
) -> TranscoderSet:
    """Train TopK transcoders for every MLP, resuming from `out/checkpoints/state.pt`; save them to `out`.

    `input_hook` / `output_hook` are `{layer}` templates over the language model's layers, or lists with one
    hook per layer (e.g. `vision_hooks(model)`); every layer's input and output need the same width."""
    out = Path(out)
    kw = dict(seed=seed, batch_size=batch_size, examples_per_batch=examples_per_batch)
    source = LayerPairs(model, input_hook, output_hook, **kw)
    first = source.batch(0)
    stacked = StackedTranscoders(first.shape[1], first.shape[-1], d_transcoder, k, seed)
    with torch.no_grad():
        stacked.b_dec.copy_(first[:, :, 1].mean(0))
    variance = first[:, :, 1].var(0).sum(-1)  # [layer]: the loss normalisation
    opt = torch.optim.Adam(stacked.parameters(), lr=lr)
    steps = total_samples // batch_size
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, steps))
    state_file = out / "checkpoints" / "state.pt"
    step = 0
    if state_file.is_file():
        state = torch.load(state_file, weights_only=True)
        stacked.load_state_dict(state["weights"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, variance = int(state["step"]), state["variance"]
    source.step = step
    bar = tqdm(total=steps, initial=step, desc="transcoders", unit="batch")
    while step < steps:
        batch = next(source)
        _, recon = stacked(batch[:, :, 0])
        err = (recon - batch[:, :, 1]).pow(2).sum(-1).mean(0)  # [layer]
        loss = (err / variance).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(fve=f"{1 - float((err.detach() / variance).mean()):.3f}")
        if step % checkpoint_every == 0 or step == steps:
            _checkpoint(state_file, stacked, opt, sched, step, variance)
    bar.close()
    ts = stacked.to_set(input_hook, output_hook, scan=scan or out.name)
    save_transcoders(ts, out)
    return ts


def _checkpoint(path: Path, stacked: nn.Module, opt: Any, sched: Any, step: int, variance: Tensor) -> None:
    """Write the training state atomically (a crash mid-write leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(
        weights=stacked.state_dict(),
        optimizer=opt.state_dict(),
        scheduler=sched.state_dict(),
        step=step,
        variance=variance,
    )
    torch.save(state, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)


def main(argv: Sequence[str] | None = None) -> TranscoderSet:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava", help="a shipped checkpoint name or a path")
    p.add_argument("--out", required=True, help="folder for the transcoders (and checkpoints/ to resume from)")
    p.add_argument("--d-transcoder", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--samples", type=int, default=2**22, help="training positions (each gives every layer's pair)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tower", choices=("language", "vision"), default="language", help="which MLPs to replace")
    a = p.parse_args(argv)
    from hooked_llava.model.hooked_llava import HookedLlava

    torch.set_num_threads(a.threads)
    model = HookedLlava.from_pretrained(a.model)
    wall, cpu = time.time(), time.process_time()
    kw: dict[str, Any] = dict(d_transcoder=a.d_transcoder, k=a.k, total_samples=a.samples, batch_size=a.batch_size)
    if a.tower == "vision":
        kw["input_hook"], kw["output_hook"] = vision_hooks(model)
    ts = train_transcoders(model, a.out, seed=a.seed, lr=a.lr, **kw)
    record = dict(
        name=Path(a.out).name,
        model=a.model,
        command="python -m hooked_llava.transcoders.train " + " ".join(sys.argv[1:] if argv is None else argv),
        seed=a.seed,
        samples=a.samples,
        batch_size=a.batch_size,
        lr=a.lr,
        d_transcoder=a.d_transcoder,
        k=a.k,
        tower=a.tower,
        minutes=(time.time() - wall) / 60,
        cpu_minutes=(time.process_time() - cpu) / 60,
    )
    (Path(a.out) / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return ts


if __name__ == "__main__":
    main()
