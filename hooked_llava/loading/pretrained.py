"""Loading HookedLlava from HF models, local directories, shipped names and hub ids.

`from_pretrained` reads `config.json` and the safetensors shards directly into a model
built on the meta device, so peak memory stays close to one copy of the weights. Names are
resolved in `resolve.py` (local folders first, the hub under a deadline); which files are read,
and how ambiguity is refused, lives in `checkpoint_files.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hooked_llava.loading import devices
from hooked_llava.loading.agreement import check_processor
from hooked_llava.loading.checkpoint_files import load_weights, read_json, regular_file, weight_files
from hooked_llava.loading.convert import CheckpointError, convert
from hooked_llava.loading.processors import load_onevision_processor
from hooked_llava.loading.resolve import SHIPPED, resolve
from hooked_llava.model.config import InvalidConfigError, configs_from_hf
from hooked_llava.model.weights import REFACTOR_REFUSED

__all__ = ["SHIPPED", "LoadingMixin", "read_checkpoint", "resolve"]
PROCESSOR_FILES = (
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
    "tokenizer.model",
    "merges.txt",
    "chat_template.jinja",
)


def read_checkpoint(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory; pickled `.bin` files only with `allow_pickle`."""
    files, weight_map = weight_files(directory, "model", ".safetensors")
    if files:
        return load_weights(files, load_file, weight_map)
    pickled, weight_map = weight_files(directory, "pytorch_model", ".bin")
    if not pickled:
        raise CheckpointError(f"no safetensors or .bin weights found in {directory}.")
    if not allow_pickle:
        raise CheckpointError(
            f"{directory} only has pickled weights ({pickled[0].name}); pickles can run code when loaded. "
            "Convert them to safetensors, or pass allow_pickle=True to load them with weights_only=True."
        )
    return load_weights(pickled, lambda f: torch.load(f, map_location="cpu", weights_only=True), weight_map)


def _load_processor(directory: Path) -> Any:
    """The processor (or tokenizer) saved in `directory`; None if it has no processor files at all."""
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.utils import is_torchvision_available

    present = [directory / name for name in PROCESSOR_FILES if (directory / name).exists()]
    if not present:
        return None
    for path in present:  # a FIFO would block the reader; a broken JSON file would be skipped silently
        read_json(path) if path.suffix == ".json" else regular_file(path)
    errors = []
    # OneVision's processor needs torchvision in HF; without it, the same processor for images and text.
    loaders = (AutoProcessor.from_pretrained, AutoTokenizer.from_pretrained)
    if _model_type(directory) == "llava_onevision" and not is_torchvision_available():
        loaders = (load_onevision_processor, *loaders)
    for loader in loaders:
        try:
            return loader(directory)
        except Exception as err:  # noqa: BLE001 - every failure is reported below
            name = getattr(loader, "__qualname__", str(loader)).split(".")[0]
            errors.append(f"{name}: {type(err).__name__}: {str(err)[:300]}")
    raise CheckpointError(
        f"the processor files in {directory} ({', '.join(p.name for p in present)}) could not be loaded "
        f"({'; '.join(errors)}). Fix or remove them, or pass processor=... to use your own."
    )


def _model_type(directory: Path) -> str | None:
    config = directory / "config.json"
    return read_json(config).get("model_type") if config.exists() else None


def _read_config(directory: Path, name: str) -> Any:
    """The HF config of `directory`, or an error naming config.json and what is wrong with it."""
    from transformers import AutoConfig

    if not (directory / "config.json").exists():
        shipped = SHIPPED / name
        hint = f" A shipped model has that name too: pass {shipped} to load it." if shipped.is_dir() else ""
        raise FileNotFoundError(f"{directory} has no config.json; pass the folder a model was saved to.{hint}")
    read_json(directory / "config.json")  # a clear error for a FIFO or broken JSON
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as err:  # transformers validates fields itself, with several error types
        raise InvalidConfigError(f"{directory / 'config.json'} is invalid: {type(err).__name__}: {err}") from err


def _dtype(hf_config: Any, dtype: Any) -> torch.dtype:
    value = dtype if dtype is not None else getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value.replace("torch.", ""))
    return value if isinstance(value, torch.dtype) else torch.float32


PROCESSING = (
    "fold_ln",
    "center_writing_weights",
    "center_unembed",
    "fold_value_biases",
    "refactor_factored_attn_matrices",
)


def _processing(flags: dict[str, Any]) -> dict[str, bool]:
    """The weight-processing flags, each False unless given; an unknown keyword is an error."""
    unknown = sorted(set(flags) - set(PROCESSING))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; weight processing takes {list(PROCESSING)}.")
    if flags.get("refactor_factored_attn_matrices"):  # refused before any weight is read
        raise ValueError(REFACTOR_REFUSED)
    return {name: bool(flags.get(name, False)) for name in PROCESSING}


def _placed(model: Any, device_map: Any, processing: dict[str, bool]) -> Any:
    plan = devices.plan_devices(model.cfgs, device_map, devices.part_numels(model))
    if any(processing.values()):
        model.process_weights(**processing)
    devices.place(model, plan)
    model.cfg.device = str(plan["embed"])
    return model


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
        processing: dict[str, bool],
        device_map: Any = None,
    ) -> Any:
        if device_map is not None and device is not None:
            raise ValueError("pass either device= (one device) or device_map= (several), not both.")
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
        model.eval()
        if device_map is not None:  # weights are processed on the CPU, before any part is placed
            return _placed(model, device_map, processing)
        device = device or "cpu"
        model.cfg.device = str(device)
        model = model.to(device)
        if any(processing.values()):
            model.process_weights(**processing)
        return model

    @classmethod
    def from_hf(
        cls,
        hf_model: Any,
        processor: Any = None,
        *,
        dtype: Any = None,
        device: Any = None,
        device_map: Any = None,
        **processing: bool,
    ) -> Any:
        """Build from a loaded `LlavaForConditionalGeneration` (or `LlamaForCausalLM`); weights are copied.
        `processing`: the weight-processing flags of `from_pretrained`."""
        processing = _processing(processing)
        state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
        dtype = dtype or next(hf_model.parameters()).dtype
        if device_map is None:
            device = device or next(hf_model.parameters()).device
        return cls._build(hf_model.config, state, dtype, device, processor, processing, device_map)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path,
        dtype: Any = None,
        device: Any = None,
        *,
        processor: Any = None,
        allow_pickle: bool = False,
        device_map: Any = None,
        **processing: bool,
    ) -> Any:
        """Load a local directory, a shipped model ("shapes-llava", "shapes-lm") or a hub id "org/name".

        A local directory wins over a shipped model of the same name (with a warning); a path that
        does not exist is an error and never goes to the hub; the hub must answer within
        `HOOKED_LLAVA_HUB_TIMEOUT` seconds (default 30), else set `HF_HUB_OFFLINE=1` to use the cache.

        Args:
            dtype: defaults to the checkpoint's dtype (float32 if it does not say).
            processor: defaults to the processor (or tokenizer) saved with the checkpoint; saved
                processor files that do not load are an error unless you pass your own.
            allow_pickle: allow pickled `.bin` weights, loaded with `weights_only=True`.
            device_map: place the model across devices instead of on `device`: "auto", a number of
                CUDA devices, a list of devices (e.g. ["cuda:0", "cpu"]) or a dict from parts to devices
                (see `hooked_llava.loading.devices`, which also tabulates each part's memory for 7B–34B).
            processing: TransformerLens' weight-processing flags `fold_ln`, `center_writing_weights`,
                `center_unembed`, `fold_value_biases`, `refactor_factored_attn_matrices` (see
                `process_weights`). All default to False, as TL's `from_pretrained_no_processing`:
                the weights stay HF's. `center_writing_weights` is a no-op for RMSNorm (with a warning)
                and `refactor_factored_attn_matrices` is refused for rotary models, as in TL.

        Example:
            >>> model = HookedLlava.from_pretrained("shapes-llava")
        """
        processing = _processing(processing)
        directory = resolve(name_or_dir)
        hf_config = _read_config(directory, str(name_or_dir))
        cfgs = configs_from_hf(hf_config)  # refuse an unsupported config before reading any weights
        if device_map is not None:  # and a device map that does not fit it
            devices.plan_devices(cfgs, device_map)
        state = read_checkpoint(directory, allow_pickle)
        if processor is None:
            processor = _load_processor(directory)
            check_processor(hf_config, processor, directory)  # the saved processor must fit config.json
        return cls._build(hf_config, state, _dtype(hf_config, dtype), device, processor, processing, device_map)
