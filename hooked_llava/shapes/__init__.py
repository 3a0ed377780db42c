"""The Shapes world and the toy LLaVA trained on it.

A seeded generator of scenes and questions (``ShapesWorld``, ``make_dataset``), the word-level
tokenizer and ``LlavaProcessor`` (``build_processor``), and the paths of the two checkpoints
that ship with the package: ``"shapes-llava"`` (a ``LlavaForConditionalGeneration``) and
``"shapes-lm"`` (its base ``LlamaForCausalLM``).

This subpackage depends only on numpy, PIL, torch, tokenizers and transformers, never on the
rest of ``hooked_llava``, so it can be imported on its own.
"""

from pathlib import Path

from hooked_llava.shapes.questions import CATEGORIES, TARGETS, Example, Question, ask, format_prompt
from hooked_llava.shapes.scene import COLORS, SHAPES, Scene, ShapeObject
from hooked_llava.shapes.world import ShapesWorld, make_dataset

CHECKPOINTS_DIR = Path(__file__).resolve().parent.parent / "checkpoints"
CHECKPOINT_NAMES: tuple[str, ...] = (
    "shapes-llava",
    "shapes-lm",
    "shapes-llava-sae",
    "shapes-llava-transcoders",
    "shapes-llava-vision-transcoders",
)


def checkpoint_path(name: str) -> Path:
    """Directory of a shipped checkpoint: ``"shapes-llava"``, ``"shapes-lm"``, the SAE ``"shapes-llava-sae"``
    or the transcoders ``"shapes-llava-transcoders"`` (language model) and ``"shapes-llava-vision-transcoders"``
    (vision MLPs and projector).

    Raises:
        ValueError: If ``name`` is not a shipped checkpoint.
    """
    if name not in CHECKPOINT_NAMES:
        raise ValueError(f"unknown Shapes checkpoint {name!r}; expected one of {CHECKPOINT_NAMES}")
    return CHECKPOINTS_DIR / name


def build_processor():  # -> transformers.LlavaProcessor
    """The Shapes ``LlavaProcessor``: word-level tokenizer and a 64 px ``CLIPImageProcessor``."""
    from hooked_llava.shapes.tokenizer import build_processor as _build  # transformers is imported lazily

    return _build()


__all__ = [
    "CATEGORIES",
    "CHECKPOINTS_DIR",
    "CHECKPOINT_NAMES",
    "COLORS",
    "SHAPES",
    "TARGETS",
    "Example",
    "Question",
    "Scene",
    "ShapeObject",
    "ShapesWorld",
    "ask",
    "build_processor",
    "checkpoint_path",
    "format_prompt",
    "make_dataset",
]
