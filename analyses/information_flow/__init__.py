"""Study B: information flow by attention knockout, one example or a dataset.

- `flows.py`: flows as (source, target) position sets and their masks.
- `attention_knockout.py`: `knockout` and `knockout_sweep` (windows of layers).
- `stats.py`: means with Student-t intervals.
- `examples.py`, `gqa.py`: sweep examples from the Shapes world or a GQA task CSV.
- `keys.py`, `sweep.py`: resumable dataset sweeps keyed by their settings.
- `lock.py`: one sweep per folder at a time (an OS file lock).
- `ray_sweep.py`: the same sweep sharded over Ray actors (Ray is imported inside its functions only).

May import: `analyses.readout`, `analyses.ranges`, other analyses packages and the public packages of
`hooked_llava`. Never the CLI or the course.
"""

from analyses.information_flow.attention_knockout import block_scores, knockout, knockout_sweep
from analyses.information_flow.examples import BadExampleError, SweepExample, answer_token, iter_rows, shapes_examples
from analyses.information_flow.flows import flow_mask, resolve_flows, window_layers
from analyses.information_flow.gqa import GQAFileError, GQAFormatError, ImageFile, gqa_examples, read_gqa
from analyses.information_flow.keys import (
    SettingsChangedError,
    SweepFolderError,
    claim_folder,
    example_key,
    image_digest,
    model_fingerprint,
)
from analyses.information_flow.lock import SweepLockedError, sweep_lock
from analyses.information_flow.stats import summarize_knockout, t_quantile
from analyses.information_flow.sweep import (
    DEFAULT_FLOWS,
    ERROR_COLUMNS,
    TABLES,
    collect,
    run_sweep,
    summary_table,
    sweep_settings,
    write_tables,
)

__all__ = [
    "BadExampleError",
    "DEFAULT_FLOWS",
    "ERROR_COLUMNS",
    "GQAFileError",
    "GQAFormatError",
    "ImageFile",
    "SettingsChangedError",
    "SweepExample",
    "SweepFolderError",
    "SweepLockedError",
    "TABLES",
    "answer_token",
    "block_scores",
    "claim_folder",
    "collect",
    "example_key",
    "flow_mask",
    "gqa_examples",
    "image_digest",
    "iter_rows",
    "knockout",
    "knockout_sweep",
    "model_fingerprint",
    "read_gqa",
    "resolve_flows",
    "run_sweep",
    "shapes_examples",
    "summarize_knockout",
    "summary_table",
    "sweep_lock",
    "sweep_settings",
    "t_quantile",
    "window_layers",
    "write_tables",
]
