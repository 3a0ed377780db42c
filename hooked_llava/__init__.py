"""hooked_llava: LLaVA reimplemented with live TransformerLens hooks, for mechanistic interpretability.

Packages (each `__init__` says what lives there and what it may import):
- `model/`: `HookedLlava` and its forward path, configs, components, attention, vision tower, packings;
- `inputs/`: `LlavaInputs`, processing with the HF processor, prompts, geometry, input checks;
- `loading/`: names to checkpoints, checkpoint files, conversion, device placement;
- `surface/`: the TransformerLens surface as mixins (hooks and caches, tokens, generation, locking);
- `saes/`: SAELens SAEs spliced into the model (optional); `shapes/`: the Shapes world and the shipped
  models; `course/`: the course's solutions and checkers; `cli/`: the `hooked-llava` command.
"""

from hooked_llava.inputs import LLAVA15_TEMPLATE, ROLES, LlavaInputs
from hooked_llava.loading import CheckpointError
from hooked_llava.model.config import InvalidConfigError, LanguageConfig, UnsupportedConfigError, VisionConfig
from hooked_llava.model.hooked_llava import HookedLlava
from hooked_llava.model.kv_cache import KeyValueCache, KeyValueCacheEntry

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
