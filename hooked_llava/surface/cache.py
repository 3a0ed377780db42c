"""`LlavaActivationCache`: TransformerLens' `ActivationCache`, which says when its norm-applied stacks are not exact.

TransformerLens folds each norm's weight into the matrices that read from it when it loads a model
(`fold_ln=True`), and `apply_ln_to_stack` relies on that: it divides by the cached scale and leaves the
weight out. A `HookedLlava` is loaded unfolded by default, so on it `logit_attrs`, `decompose_resid(apply_ln=True)`
and `accumulated_resid(apply_ln=True)` give parts that do not add up to the logit (or the normalised
residual). This cache warns once when that happens; `model.process_weights(fold_ln=True)` makes them exact.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformer_lens import ActivationCache


class LlavaActivationCache(ActivationCache):
    """`ActivationCache` that warns (once per cache) when a norm it applies has an unfolded weight."""

    _warned_unfolded = False

    def apply_ln_to_stack(self, residual_stack: Any, layer: int | None = None, mlp_input: bool = False,
                          *args: Any, **kwargs: Any) -> Any:  # fmt: skip
        """As TransformerLens'; warns when the norm applied keeps a weight (`fold_ln` not done)."""
        if not self._warned_unfolded and _unfolded(self.model, layer, mlp_input):
            self._warned_unfolded = True
            warnings.warn(
                "this model's RMSNorm weights are not folded (cfg.normalization_type is 'RMS'): apply_ln_to_stack "
                "divides by the cached scale but leaves out the norm's weight, so logit_attrs / decompose_resid / "
                "accumulated_resid parts do not sum to the logit (or normalised residual). Call "
                "model.process_weights(fold_ln=True) (TransformerLens' default) to make them exact.",
                stacklevel=3,
            )
        return super().apply_ln_to_stack(residual_stack, layer, mlp_input, *args, **kwargs)


def _unfolded(model: Any, layer: int | None, mlp_input: bool) -> bool:
    """Whether the norm `apply_ln_to_stack` stands for carries a weight other than ones."""
    if getattr(model.cfg, "normalization_type", None) != "RMS":
        return False
    n = model.cfg.n_layers
    if layer is None or layer == n or layer == -1:
        norm = model.ln_final
    else:
        block = model.blocks[layer]
        norm = block.ln2 if mlp_input else block.ln1
    weight = getattr(norm, "w", None)
    return weight is not None and not bool((weight == 1).all())
