"""hooked_llava: LLaVA reimplemented with live TransformerLens hooks, for mechanistic interpretability."""

from .config import InvalidConfigError, LanguageConfig, UnsupportedConfigError, VisionConfig
from .convert import CheckpointError
from .inputs import LLAVA15_TEMPLATE, ROLES, LlavaInputs
from .kv_cache import KeyValueCache, KeyValueCacheEntry
from .model import HookedLlava

__all__ = [
    "LLAVA15_TEMPLATE",
    "ROLES",
    "CheckpointError",
    "HookedLlava",
    "InvalidConfigError",
    "KeyValueCache",
    "KeyValueCacheEntry",
    "LanguageConfig",
    "LlavaInputs",
    "UnsupportedConfigError",
    "VisionConfig",
]
