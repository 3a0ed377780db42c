"""Inputs: what the model is given, and the role of every position in it.

- `llava_inputs.py`: `LlavaInputs` (token ids, pixels, masks; `positions`, `patch_rc`, `image_map`).
- `processing.py`: `prepare`, images and prompts through the checkpoint's HF processor.
- `images.py`: the one conversion of pixels to the processor's 0-255 scale (`to_byte_range`), and
  `open_image`, which reads a file without converting it.
- `onevision_prompts.py`: LLaVA-OneVision prompts (several images per question, text-only rows, video).
- `prompts.py`: questions into prompts with the model's chat template; unknown-word errors.
- `geometry.py`: pixel boxes to patches, and the position map of image tokens.
- `checks.py`: input validation with messages that say how to fix the input.

May import: `hooked_llava.model.next` and `hooked_llava.model.onevision` (the packings' token counts and
maps). Never the model class itself,
`analyses`, `shapes`, `course` or the CLI.
"""

from hooked_llava.inputs.llava_inputs import ROLES, LlavaInputs
from hooked_llava.inputs.processing import prepare
from hooked_llava.inputs.prompts import LLAVA15_TEMPLATE

__all__ = ["LLAVA15_TEMPLATE", "ROLES", "LlavaInputs", "prepare"]
