"""What the report's sections share: the `Report` they fill, the flows and sections it shows, the
noise floor of a readout, and how a token is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from hooked_llava import HookedLlava

FLOWS = ["question->last", "image->last", "image->question", "last->last"]
TEXT_FLOWS = ["question->last", "last->last"]
SECTIONS = ("answer", "logit-lens", "heads", "patches", "knockout", "embedding")
TEXT_SECTIONS = ("answer", "logit-lens", "heads", "knockout")
# Differences of log-probabilities a readout can resolve: float32 rounding sits near 1e-5 nats.
NOISE_FLOOR = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass
class Report:
    """Everything `explain` computed: headline numbers, figures (by file stem), tables, notes.

    Example:
        >>> report = explain(model, model.prepare(images=[image], questions=["What is the color of the circle?"]))
        >>> report.answer, report.probability, sorted(report.figures)
    """

    model: str
    prompt: str
    question: str
    answer: str
    answer_id: int
    probability: float
    sections: tuple[str, ...] = SECTIONS
    image: np.ndarray | None = None  # the image as the vision tower saw it, [h, w, 3] in [0, 1]
    figures: dict[str, Figure] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # sentences shown in the report, by section
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # patch maps, [grid, grid]
    explorers: dict[str, Any] = field(default_factory=dict)  # interactive views (analyses.viz), by section
    timings: dict[str, float] = field(default_factory=dict)


def token_text(model: HookedLlava, token: int) -> str:
    """A token as the tokenizer decodes it; quoted when it has surrounding spaces (e.g. `' red'`).

    Example:
        >>> token_text(model, model.to_single_token("red"))  # 'red'
    """
    text = model.tokenizer.decode([int(token)])
    return text if text and text.strip() == text else repr(text)
