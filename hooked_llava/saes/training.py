"""Train SAELens SAEs on a HookedLlava hook with SAELens's own trainer (`SAETrainer`).

`ShapesActivations` is the activation source: an iterator of `[batch_size, d_in]` batches of one
hook's activations on Shapes-world questions, at the positions of chosen roles (image patches,
text tokens, ...). Batch `k` is a pure function of `(seed, k)`, so a run resumed from an SAELens
checkpoint sees exactly the batches the interrupted run would have seen. `train_sae` wires it into
`SAETrainer` (progress bar, checkpoints) and saves the inference SAE in SAELens's on-disk format.

    python -m hooked_llava.saes.training --model shapes-llava --hook blocks.4.hook_resid_post --out DIR
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from hooked_llava.shapes.questions import CATEGORIES
from hooked_llava.shapes.world import ShapesWorld

DEFAULT_ROLES = ("image", "text")


class ShapesActivations:
    """Batches of a hook's activations on Shapes-world examples, for SAELens's trainer.

    Args:
        model: the HookedLlava to read.
        hook_name: the hook whose activations are streamed (an LM hook `[batch, pos, d]`; vision
            hooks are flattened over images and patches).
        seed: seed of the Shapes world and of the sampling; batch `k` depends only on `(seed, k)`.
        batch_size: activation vectors per batch.
        examples_per_batch: questions run through the model per batch (categories in rotation).
        roles: positions kept (`inputs.mask(role)` for each; see `hooked_llava.ROLES`).
        start: index of the first batch (to resume).
    """

    def __init__(
        self,
        model: Any,
        hook_name: str,
        *,
        seed: int = 0,
        batch_size: int = 1024,
        examples_per_batch: int = 32,
        roles: Sequence[str] = DEFAULT_ROLES,
        categories: Sequence[str] = CATEGORIES,
        start: int = 0,
    ):
        if hook_name not in model.hook_dict:
            raise KeyError(f"unknown hook {hook_name!r}; see model.hook_names.")
        if not roles:
            raise ValueError("roles is empty: give at least one role, e.g. ('image', 'text').")
        self.model, self.hook_name, self.seed = model, hook_name, seed
        self.batch_size, self.examples_per_batch = batch_size, examples_per_batch
        self.roles, self.categories, self.step = tuple(roles), tuple(categories), start
        self.world = ShapesWorld(seed)
        layer = re.match(r"blocks\.(\d+)\.", hook_name)
        self._stop = int(layer.group(1)) + 1 if layer else None

    def __iter__(self) -> ShapesActivations:
        return self

    def __next__(self) -> Float[Tensor, "batch ..."]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def examples(self, k: int) -> list[Any]:
        n = self.examples_per_batch
        return [self.world.example(i, self.categories[i % len(self.categories)]) for i in range(k * n, (k + 1) * n)]

    @torch.no_grad()
    def activations(self, examples: Sequence[Any]) -> Float[Tensor, "n d_in"]:
        """All activation vectors of these examples at the hook, at the chosen roles' positions."""
        inputs = self.model.prepare(images=[e.image for e in examples], prompts=[e.prompt for e in examples])
        _, cache = self.model.run_with_cache(inputs, names_filter=[self.hook_name], stop_at_layer=self._stop)
        acts = cache[self.hook_name]
        if acts.shape[:2] != inputs.input_ids.shape:  # vision hooks: every image patch
            return acts.reshape(-1, acts.shape[-1])
        return acts[self.role_mask(inputs).to(acts.device)]

    def role_mask(self, inputs: Any) -> Tensor:
        """`[batch, pos]` mask of the positions kept: the union of the chosen roles."""
        mask = torch.zeros_like(inputs.attention_mask, dtype=torch.bool)
        for role in self.roles:
            mask |= inputs.mask(role)
        return mask

    def batch(self, k: int) -> Float[Tensor, "batch ..."]:
        """Batch `k`: `batch_size` vectors drawn without replacement from the examples of batch `k`."""
        acts = self.activations(self.examples(k))
        if len(acts) < self.batch_size:
            raise ValueError(
                f"{self.examples_per_batch} examples give only {len(acts)} vectors at roles {self.roles}, fewer "
                f"than batch_size={self.batch_size}: raise examples_per_batch or lower batch_size."
            )
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        return acts[torch.randperm(len(acts), generator=gen)[: self.batch_size].to(acts.device)].float()


def _latest_checkpoint(folder: Path) -> Path | None:
    """The SAELens checkpoint with the most training samples under `folder`, if any."""
    numbered = [(int(p.parent.name), p.parent) for p in folder.glob("*/trainer_state.pt") if p.parent.name.isdigit()]
    return max(numbered)[1] if numbered else None


def build_sae(d_in: int, hook_name: str, model_name: str, *, d_sae: int, k: int, seed: int, device: Any) -> Any:
    """A fresh SAELens TopK training SAE for one hook, initialised from `seed`."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    torch.manual_seed(seed)
    cfg = TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=str(device))
    cfg.metadata.hook_name = hook_name
    cfg.metadata.model_name = model_name
    return TopKTrainingSAE(cfg)


def train_sae(
    model: Any,
    hook_name: str,
    out: str | Path,
    *,
    d_sae: int = 1024,
    k: int = 16,
    total_samples: int = 2**20,
    batch_size: int = 1024,
    lr: float = 1e-3,
    seed: int = 0,
    examples_per_batch: int = 32,
    roles: Sequence[str] = DEFAULT_ROLES,
    n_checkpoints: int = 4,
    model_name: str = "shapes-llava",
) -> Any:
    """Train a TopK SAE on `hook_name` with SAELens's `SAETrainer`, resuming from `out/checkpoints`.

    Returns the inference SAE, also saved to `out` (`SAE.load_from_disk(out)` loads it).
    """
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    out = Path(out)
    source = ShapesActivations(
        model, hook_name, seed=seed, batch_size=batch_size, examples_per_batch=examples_per_batch, roles=roles
    )
    device = model.W_E.device
    d_in = source.activations(source.examples(0)[:1]).shape[-1]
    sae = build_sae(d_in, hook_name, model_name, d_sae=d_sae, k=k, seed=seed, device=device)
    steps = total_samples // batch_size
    cfg = SAETrainerConfig(
        total_training_samples=total_samples,
        train_batch_size_samples=batch_size,
        lr=lr,
        lr_end=lr / 10,
        lr_warm_up_steps=max(steps // 20, 1),
        lr_decay_steps=steps // 5,
        device=str(device),
        dead_feature_window=max(steps // 4, 1),
        feature_sampling_window=max(steps // 2, 1),
        n_checkpoints=n_checkpoints,
        checkpoint_path=str(out / "checkpoints"),
    )
    trainer = SAETrainer(cfg, sae, source)
    checkpoint = _latest_checkpoint(out / "checkpoints")
    if checkpoint is not None:
        sae.load_weights_from_checkpoint(checkpoint)
        trainer.load_trainer_state(checkpoint)
        source.step = trainer.n_training_samples // batch_size
    trainer.fit()
    sae.save_inference_model(out)
    return SAE.load_from_disk(out, device=str(device))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapes-llava", help="a shipped checkpoint name or a path")
    p.add_argument("--hook", default="blocks.4.hook_resid_post")
    p.add_argument("--out", required=True, help="folder for the SAE (and checkpoints/ to resume from)")
    p.add_argument("--d-sae", type=int, default=1024)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--samples", type=int, default=2**20, help="training activation vectors")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    from hooked_llava.model.hooked_llava import HookedLlava

    torch.set_num_threads(a.threads)
    model = HookedLlava.from_pretrained(a.model)
    kw = dict(d_sae=a.d_sae, k=a.k, total_samples=a.samples, batch_size=a.batch_size, lr=a.lr, seed=a.seed)
    train_sae(model, a.hook, a.out, model_name=str(a.model), **kw)


if __name__ == "__main__":
    main()
