"""Evaluate an SAE at a HookedLlava hook on held-out Shapes questions, and write its model card.

Metrics (all on questions from the held-out world `EVAL_SEED`, at image and text positions):
fraction of variance explained, mean L0, dead features (never active), and the model's answer
accuracy and next-token losses with the SAE's reconstruction in place of the activation.

    python -m analyses.saes.card --sae hooked_llava/checkpoints/shapes-llava-sae
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hooked_llava.saes.training import ShapesActivations
from hooked_llava.shapes.evaluate import EVAL_SEED, answer_scores
from hooked_llava.shapes.questions import CATEGORIES
from hooked_llava.shapes.world import make_dataset


@torch.no_grad()
def reconstruction_stats(model: Any, sae: Any, examples: Sequence[Any], batch: int = 64) -> dict[str, float | int]:
    """FVE `1 - Σ‖x - x̂‖² / Σ‖x - mean x‖²`, mean L0 and dead features over the examples' activations."""
    source = ShapesActivations(model, sae.cfg.metadata.hook_name)
    x = torch.cat([source.activations(examples[i : i + batch]) for i in range(0, len(examples), batch)])
    acts = sae.encode(x)
    err = (x - sae.decode(acts)).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    fired = (acts > 0).float()
    return {
        "n_vectors": len(x),
        "fve": float(1 - err / var),
        "mean_l0": float(fired.sum(1).mean()),
        "dead_features": int((fired.sum(0) == 0).sum()),
        "d_sae": int(acts.shape[-1]),
    }


def evaluate(model: Any, sae: Any, n_per_category: int = 100, seed: int = EVAL_SEED) -> dict[str, Any]:
    """All card metrics; `model` must be a `HookedSAELlava`."""
    examples = make_dataset(seed, n_per_category, CATEGORIES)
    result: dict[str, Any] = {"eval_seed": seed, "n_questions": len(examples)}
    result.update(reconstruction_stats(model, sae, examples))
    result["original"] = answer_scores(model, examples)
    with model.saes(sae, use_error_term=False):
        result["spliced"] = answer_scores(model, examples)
    return result


def ground_truth(model: Any, sae: Any, n_scenes: int = 300, seed: int = EVAL_SEED) -> dict[str, Any]:
    """The ground-truth score summary (`analyses.saes.groundtruth`) on held-out scenes."""
    from analyses.saes import groundtruth as gt
    from hooked_llava.shapes.world import ShapesWorld

    world = ShapesWorld(seed)
    examples = [world.example(i, "Colour") for i in range(n_scenes)]
    attrs = gt.patch_attributes(world, [e.scene for e in examples])
    acts = gt.patch_activations(model, sae.cfg.metadata.hook_name, examples)
    scores = gt.ground_truth_scores(sae, acts, attrs)
    per_method, per_attr = gt.summarize(scores)
    with torch.no_grad():
        families = gt.feature_families(sae.encode(acts) > 0, attrs)
    return {
        "n_scenes": n_scenes,
        "n_patches": int(attrs.shape[0]),
        "n_random": int(sae.cfg.d_sae),
        "per_method": per_method.to_dict("records"),
        "per_attribute": per_attr.to_dict("records"),
        "uncaptured_by_sae": per_attr.loc[per_attr["sae"] == 0, "attribute"].tolist(),
        "families": families.to_dict("records"),
    }


def card(metrics: dict[str, Any], training: dict[str, Any]) -> str:
    """The README of a shipped SAE, from `evaluate`'s metrics and the training record."""
    o, s = metrics["original"], metrics["spliced"]
    accuracy = f"{o['accuracy']:.1f} % → {s['accuracy']:.1f} % ({s['accuracy'] - o['accuracy']:+.1f} points)"
    prompt_loss = f"{o['next_token_loss']:.3f} → {s['next_token_loss']:.3f}"
    return f"""# {training["name"]}

A TopK sparse autoencoder (SAELens `TopKSAE`, {metrics["d_sae"]} features, k = {training["k"]}) on
`{training["hook"]}` of `{training["model"]}`, trained with SAELens's `SAETrainer` on the activations
of Shapes-world questions at image and text positions. Load it with SAELens's own loader:

```python
from sae_lens import SAE
from hooked_llava.saes.splice import HookedSAELlava
from hooked_llava.shapes import checkpoint_path

model = HookedSAELlava.from_pretrained("{training["model"]}")
sae = SAE.load_from_disk(checkpoint_path("{training["name"]}"))
logits, cache = model.run_with_cache_with_saes(inputs, saes=[sae])  # cache["{training["hook"]}.hook_sae_acts_post"]
```

## Training

`{training["command"]}` — {training["samples"]:,} activation vectors in batches of {training["batch_size"]}
(world seed {training["seed"]}), {training["minutes"]:.1f} min wall-clock ({training["cpu_minutes"]:.1f} min of process
CPU time) on a 2-core CPU machine with 1 torch thread. {training.get("note", "")}

## Evaluation

On {metrics["n_questions"]} held-out questions (world seed {metrics["eval_seed"]},
{metrics["n_vectors"]:,} activation vectors):

| metric | value |
|---|---|
| fraction of variance explained | {100 * metrics["fve"]:.1f} % |
| mean L0 (active features per position) | {metrics["mean_l0"]:.1f} |
| dead features (never active on the evaluation set) | {metrics["dead_features"]} of {metrics["d_sae"]} |
| visual-QA accuracy, original → SAE in place (no error term) | {accuracy} |
| answer-token loss (nats), original → SAE in place | {o["answer_ce"]:.4f} → {s["answer_ce"]:.4f} |
| next-token loss over the prompt's text (nats), original → SAE in place | {prompt_loss} |

The prompt's next-token loss is high for both because the model was only trained on answer,
description and caption tokens. Reproduce the tables with `{training["eval_command"]}`.
{_ground_truth_section(metrics.get("ground_truth"))}"""


def _ground_truth_section(gt: dict[str, Any] | None) -> str:
    if gt is None:
        return ""
    cells = ("method", "units", "monosemantic", "attributes_captured")
    rows = "\n".join(
        "| " + " | ".join(str(m[c]) for c in cells) + f" | {m['median_precision']:.2f} |" for m in gt["per_method"]
    )
    missing = ", ".join(gt["uncaptured_by_sae"]) or "none"
    families = "\n".join(
        f"| {f['attribute']} | {f['features']} | {f['family_precision']:.2f} | {f['family_recall']:.2f} |"
        for f in gt["families"]
    )
    return f"""
## Ground-truth score of the features

On the image patches of {gt["n_scenes"]} held-out scenes ({gt["n_patches"]:,} patches), each unit's best
ground-truth attribute (object present, colour, shape, side; `analyses.saes.groundtruth`). Monosemantic:
precision ≥ 0.9 at recall ≥ 0.5. SAE features fire when active; the baselines (and the SAE's second row)
get an oracle threshold per unit and attribute, the highest that keeps recall ≥ 0.5. Neurons are the
residual dimensions at the same hook, each with both signs; random directions are {gt["n_random"]} unit vectors.

| units | count | monosemantic | attributes captured | median precision of best attribute |
|---|---|---|---|---|
{rows}

Attributes no single SAE feature captures (active > 0): {missing}.

Features split attributes finely: many are precise but narrow. Grouping, per attribute, the features
with precision ≥ 0.9 for it (a patch counts when any of them is active):

| attribute | precise features | family precision | family recall |
|---|---|---|---|
{families}
"""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sae", required=True, help="folder of the SAE (cfg.json, sae_weights.safetensors, training.json)")
    p.add_argument("--n", type=int, default=100, help="questions per category")
    p.add_argument("--scenes", type=int, default=300, help="held-out scenes for the ground-truth score")
    a = p.parse_args(argv)
    from sae_lens import SAE

    from hooked_llava.saes.splice import HookedSAELlava

    torch.set_num_threads(1)
    folder = Path(a.sae)
    sae = SAE.load_from_disk(folder)
    training = json.loads((folder / "training.json").read_text())
    model = HookedSAELlava.from_pretrained(training["model"])
    metrics = evaluate(model, sae, a.n)
    metrics["ground_truth"] = ground_truth(model, sae, a.scenes)
    (folder / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (folder / "README.md").write_text(card(metrics, training))
    return metrics


if __name__ == "__main__":
    main()
