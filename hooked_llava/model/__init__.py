"""The model: `HookedLlava` and everything its forward pass is built from.

- `hooked_llava.py`: `HookedLlava`; its module holds the forward path, pixels → vision tower →
  projector → merge at the image placeholders (`hook_embed`) → blocks → final norm → unembed.
- `config.py`, `config_checks.py`: the configuration dataclasses, built from HF configs, and the
  errors that refuse a config.
- `components.py`, `attention.py`, `hook_points.py`: norms, MLPs, embeddings, blocks, attention
  and the hook point they all report through.
- `vision/`: the vision towers (CLIP, SigLIP) and the projector, chosen from the config by `build_tower`;
  `next.py`: LLaVA-NeXT's anyres packing; `onevision.py`: LLaVA-OneVision's (anyres_max with
  downsampling, several images per prompt, video) and its position map.
- `kv_cache.py`: key/value caches; `weights.py`, `tl_state.py`: TransformerLens weight views,
  weight processing and state-dict names.

May import: `hooked_llava.inputs`, `hooked_llava.loading`, `hooked_llava.surface` (only `hooked_llava.py`
needs them; the building blocks import nothing above them). Never `analyses`, `hooked_llava.shapes`,
`hooked_llava.course`, `hooked_llava.cli` or an optional integration. This `__init__` imports nothing,
so the building blocks load without the model class; `from hooked_llava import HookedLlava` is the
public path.
"""
