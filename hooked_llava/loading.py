"""Loading HookedLlava from HF models, local directories, shipped names and hub ids.

`from_pretrained` reads `config.json` and the safetensors shards directly into a model
built on the meta device, so peak memory stays close to one copy of the weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .config import configs_from_hf
from .convert import CheckpointError, convert

SHIPPED = Path(__file__).parent / "checkpoints"
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve(name_or_dir: str | Path) -> Path:
    """A shipped short name (e.g. "shapes-llava"), a local directory, or a hub id (downloaded)."""
    path = Path(name_or_dir)
    if (SHIPPED / str(name_or_dir)).is_dir():
        return SHIPPED / str(name_or_dir)
    if path.is_dir():
        return path
    if path.exists() or str(name_or_dir).startswith((".", "/")):
        raise FileNotFoundError(f"{name_or_dir} is not a model directory.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_dir), allow_patterns=_HUB_FILES))
    except Exception as err:  # the hub client raises many types; say what we tried
        shipped = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
        raise FileNotFoundError(
            f"could not find {name_or_dir!r}: it is not a shipped model ({', '.join(shipped) or 'none'}), "
            f"not a local directory, and downloading it from the hub failed ({type(err).__name__}: {err})."
        ) from err


def _shards(directory: Path, suffix: str, index: str) -> list[Path]:
    index_file = directory / index
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return [directory / f for f in dict.fromkeys(weight_map.values())]
    return sorted(directory.glob(f"*{suffix}"))


def read_checkpoint(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; pickled `.bin` files only with `allow_pickle`."""
    shards = _shards(directory, ".safetensors", "model.safetensors.index.json")
    if shards:
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(shard))
        return state
    pickled = _shards(directory, ".bin", "pytorch_model.bin.index.json")
    if not pickled:
        raise CheckpointError(f"no safetensors or .bin weights found in {directory}.")
    if not allow_pickle:
        raise CheckpointError(
            f"{directory} only has pickled weights ({pickled[0].name}); pickles can run code when loaded. "
            "Convert them to safetensors, or pass allow_pickle=True to load them with weights_only=True."
        )
    state = {}
    for shard in pickled:
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    return state


def _load_processor(directory: Path) -> Any:
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            return loader.from_pretrained(directory)
        except Exception:  # noqa: BLE001 - a directory may simply have no processor files
            continue
    return None


def _dtype(hf_config: Any, dtype: Any) -> torch.dtype:
    value = dtype if dtype is not None else getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) else torch.float32


class LoadingMixin:
    """`from_hf` and `from_pretrained` constructors."""

    @classmethod
    def _build(
        cls,
        hf_config: Any,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype,
        device: Any,
        processor: Any,
        fold_ln: bool,
        center_unembed: bool,
    ) -> Any:
        cfgs = configs_from_hf(hf_config, dtype)  # validates the config first
        text = getattr(hf_config, "text_config", hf_config)
        tied = bool(getattr(hf_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
        converted = convert(state, cfgs, tied=tied)
        state.clear()  # the converted dict now holds the only references
        with torch.device("meta"):
            model = cls(cfgs, processor)  # type: ignore[call-arg]
        for key in list(converted):  # cast one tensor at a time: peak memory stays near one copy
            converted[key] = converted.pop(key).to(dtype)
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
        if missing or unexpected:
            raise CheckpointError(
                f"converted checkpoint does not fit the model: missing {missing}, unexpected {unexpected}"
            )
        device = device or "cpu"
        model.cfg.device = str(device)
        model = model.to(device)
        model.eval()
        if fold_ln or center_unembed:
            model.process_weights(fold_ln=fold_ln, center_unembed=center_unembed)
        return model

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        processor: Any = None,
        *,
        dtype: Any = None,
        device: Any = None,
        fold_ln: bool = False,
        center_unembed: bool = False,
    ) -> Any:
        """Build from a loaded `LlavaForConditionalGeneration` (or `LlamaForCausalLM`); weights are copied."""
        state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
        dtype = dtype or next(hf_model.parameters()).dtype
        device = device or next(hf_model.parameters()).device
        return cls._build(hf_model.config, state, dtype, device, processor, fold_ln, center_unembed)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        dtype: Any = None,
        device: Any = None,
        *,
        processor: Any = None,
        allow_pickle: bool = False,
        fold_ln: bool = False,
        center_unembed: bool = False,
    ) -> Any:
        """Load a shipped model ("shapes-llava", "shapes-lm"), a local directory or a hub id.

        Args:
            dtype: defaults to the checkpoint's dtype (float32 if it does not say).
            processor: defaults to the processor (or tokenizer) saved with the checkpoint.
            allow_pickle: allow pickled `.bin` weights, loaded with `weights_only=True`.
            fold_ln, center_unembed: weight processing as in legacy TransformerLens.

        Example:
            >>> model = HookedLlava.from_pretrained("shapes-llava")
        """
        from transformers import AutoConfig

        directory = resolve(name_or_dir)
        hf_config = AutoConfig.from_pretrained(directory)
        configs_from_hf(hf_config)  # refuse an unsupported config before reading any weights
        state = read_checkpoint(directory, allow_pickle)
        processor = processor if processor is not None else _load_processor(directory)
        return cls._build(hf_config, state, _dtype(hf_config, dtype), device, processor, fold_ln, center_unembed)
