"""Hugging Face model directories: config.json plus one or many safetensors shards."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from dro_jax.common.errors import DroJaxError
from dro_jax.models.config import ModelConfig


def read_hf_config(directory: Path) -> ModelConfig:
    path = directory / "config.json"
    if not path.is_file():
        raise DroJaxError(f"{directory}: not a model directory (no config.json)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DroJaxError(f"{path}: not valid JSON ({err})") from None
    return ModelConfig.from_hf_dict(raw, source=str(path))


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its index when there is one."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError) as err:
            raise DroJaxError(f"{index}: not a valid safetensors index ({err})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DroJaxError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise DroJaxError(f"{directory}: no *.safetensors weights (PyTorch .bin checkpoints are not supported)")
    return files


def _hf_name(name: str) -> str:
    """Checkpoints saved from the bare decoder lack the `model.` prefix."""
    return name if name.startswith(("model.", "lm_head.")) else "model." + name


class SafetensorsSource:
    """Reads tensors lazily (memory-mapped) from the shards of one directory.

    `read_slice` copies only the requested part out of the mapped file, so
    reading one device's part of a tensor never reads the whole tensor.
    """

    def __init__(self, directory: Path, stack: contextlib.ExitStack):
        self.description = str(directory)
        self._where: dict[str, tuple[object, str]] = {}
        for file in shard_files(directory):
            try:
                handle = stack.enter_context(safe_open(str(file), framework="numpy"))
            except (SafetensorError, OSError) as err:
                raise DroJaxError(f"{file}: not a readable safetensors file ({err})") from None
            for key in handle.keys():
                self._where[_hf_name(key)] = (handle, key)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, key = self._where[name]
        return tuple(handle.get_slice(key).get_shape())

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        handle, key = self._where[name]
        return handle.get_slice(key)[index]
