"""hooked_llava: LLaVA reimplemented with live TransformerLens hooks, for mechanistic interpretability."""

from .config import LanguageConfig, UnsupportedConfigError, VisionConfig
from .convert import CheckpointError
from .inputs import LLAVA15_TEMPLATE, ROLES, LlavaInputs
from .model import HookedLlava

__all__ = [
    "LLAVA15_TEMPLATE",
    "ROLES",
    "CheckpointError",
    "HookedLlava",
    "LanguageConfig",
    "LlavaInputs",
    "UnsupportedConfigError",
    "VisionConfig",
]
