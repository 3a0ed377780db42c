"""Sparse autoencoders (SAELens) on `HookedLlava`: an optional integration (`pip install -e ".[sae]"`).

- `splice.py`: `HookedSAELlava`, SAELens's `HookedSAETransformer` surface on our model.
- `training.py`: streaming Shapes activations into SAELens's trainer
  (`python -m hooked_llava.saes.training --out DIR`).

SAELens is imported inside these modules' functions only, so `import hooked_llava.saes` works
without it. May import the model; never `analyses`, `course` or the CLI.
"""

from hooked_llava.saes.splice import HookedSAELlava

__all__ = ["HookedSAELlava"]
