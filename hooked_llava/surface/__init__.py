"""The TransformerLens surface of `HookedLlava`, as mixins: what a `HookedTransformer` user calls.

- `hooks.py`: `run_with_cache`, `run_with_hooks`, hook-name checks (`SurfaceMixin`).
- `switches.py`: `set_use_attn_result` and the other hook switches (`HookingMixin`).
- `tokens.py`: `to_tokens`, `to_str_tokens`, `to_string`, ... (`TokensMixin`).
- `entry.py`: `input_to_embed`, `start_at_layer` entry and `loss_fn` (`EntryMixin`).
- `generation.py`: `generate` with a KV cache (`GenerationMixin`).
- `locking.py`: the per-model lock every hooked call holds (`LockingMixin`, `locked`).

May import: `hooked_llava.inputs`, `hooked_llava.loading.devices` and the model's building blocks
(hook points, KV cache). Never `analyses`, `shapes`, `course` or the CLI.
"""
