"""Loading: from a name to a placed, ready model.

- `resolve.py`: a name to a local folder, a shipped checkpoint or a hub id (with a deadline).
- `checkpoint_files.py`: which files of a checkpoint folder are read, and reading them safely.
- `convert.py`: pure state-dict conversions from Hugging Face layouts; `CheckpointError`.
- `agreement.py`: `config.json` against the saved processor config (image token, strategy, sizes).
- `pretrained.py`: `from_pretrained` (`LoadingMixin`), from an HF model, a folder or a hub id.
- `processors.py`: LLaVA-OneVision's processor where HF cannot build it (no torchvision: images and text).
- `devices.py`: placing the model's parts across devices (`device_map=`), memory per part.

May import: `hooked_llava.model.config` and the model's building blocks. Never `analyses`,
`shapes`, `course` or the CLI.
"""

from hooked_llava.loading.convert import CheckpointError

__all__ = ["CheckpointError"]
