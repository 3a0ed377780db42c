"""Study A's log-probability attribution of heads and neurons.

- `scores.py`: the log-probability increase and direct logit attribution, top units.
- `contributions.py`: what each unit writes to the last position and the frozen readout that scores it.

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.attribution.contributions import (
    FrozenReadout,
    head_vectors,
    last_query,
    position_vectors,
    resolve_targets,
    run_at_last,
    stack_layers,
)
from analyses.attribution.scores import direct_logit_attribution, log_prob_increase, top_heads, top_units

__all__ = [
    "FrozenReadout",
    "direct_logit_attribution",
    "head_vectors",
    "last_query",
    "log_prob_increase",
    "position_vectors",
    "resolve_targets",
    "run_at_last",
    "stack_layers",
    "top_heads",
    "top_units",
]
