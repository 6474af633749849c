"""Turns named checkpoint tensors into the model's parameter tree.

Every checkpoint format is reduced to a `TensorSource` that hands out parts
of tensors under their Hugging Face names. Each parameter is put together from
blocks: a block is one part of the parameter (for the layer-stacked ones, the
same part of every layer in its range, stacked), read into a host buffer of
the target dtype, copied to the device(s) that hold that part, and dropped
before the next block is read.

Without shardings the one block is the whole parameter, put on the default
device. With shardings each process reads only the parts its own devices
hold, once per distinct part (replicas share one read), and holds at most two
blocks: the one being read, and the one before it, whose buffer jax lets go
of only at its next transfer. A 70B model's stacked gate_proj is a 37.6 GB
buffer whole, 4.7 GB split 8 ways. That is also why this does not use
`jax.make_array_from_callback`: it reads every addressable device's part
before copying any, so a host with 8 devices would hold the whole tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import numpy as np
from tqdm.auto import tqdm

from dro_jax.common.errors import DroJaxError
from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, param_shapes
from dro_jax.parallel.distributed import shows_progress

Index = tuple[slice, ...]
Shardings = Any  # a tree like `param_shapes(config)` with a `jax.sharding.Sharding` as each leaf


class TensorSource(Protocol):
    """A checkpoint seen as HF-named float tensors, readable in parts."""

    description: str

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, from the checkpoint's metadata (no data read)."""
        ...

    def read_slice(self, name: str, index: Index) -> np.ndarray:
        """`tensor[index]` (one slice per dimension), reading no more of the file than the format needs."""
        ...


def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """HF name of a parameter: ("layers", "mlp", "up_proj", "weight"), 3 -> model.layers.3.mlp.up_proj.weight."""
    if path[0] == "lm_head":
        return "lm_head.weight"
    if layer is None:
        return "model." + ".".join(path)
    return f"model.layers.{layer}." + ".".join(path[1:])


@dataclasses.dataclass(frozen=True)
class _Parameter:
    """One leaf of the parameter tree and its checkpoint tensors: one per layer (stacked on axis 0) under `layers`."""

    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple[str, ...]
    stacked: bool

    @classmethod
    def of(cls, path: tuple[str, ...], leaf: jax.ShapeDtypeStruct, num_layers: int) -> _Parameter:
        stacked = path[0] == "layers"
        layers = range(num_layers) if stacked else [None]
        return cls(tuple(leaf.shape), np.dtype(leaf.dtype), tuple(hf_tensor_name(path, layer) for layer in layers), stacked)

    def check(self, source: TensorSource, available: set[str]) -> None:
        """Fails on a missing tensor or one whose shape the config does not imply."""
        want = self.shape[1:] if self.stacked else self.shape
        for name in self.names:
            if name not in available:
                raise DroJaxError(f"{source.description}: tensor {name!r} is missing")
            shape = tuple(source.shape(name))
            if shape != want:
                raise DroJaxError(f"{source.description}: tensor {name!r} has shape {shape}, the config implies {want}")

    def read(self, source: TensorSource, index: Index) -> np.ndarray:
        """`parameter[index]` as a host array of the parameter's dtype; stacked ones are filled one layer at a time."""
        if not self.stacked:
            return np.asarray(source.read_slice(self.names[0], index), dtype=self.dtype)
        layers = range(len(self.names))[index[0]]
        block = np.empty(tuple(len(range(n)[s]) for n, s in zip(self.shape, index)), dtype=self.dtype)
        for row, layer in enumerate(layers):
            block[row] = source.read_slice(self.names[layer], index[1:])
        return block

    def place(self, source: TensorSource, sharding: jax.sharding.Sharding) -> jax.Array:
        """The parameter laid out by `sharding`, from one block per distinct part that this process's devices hold."""
        parts: dict[tuple, list] = {}
        for device, index in sharding.addressable_devices_indices_map(self.shape).items():
            parts.setdefault(tuple(s.indices(n) for s, n in zip(index, self.shape)), []).append(device)
        shards = []
        for part, devices in parts.items():
            block = self.read(source, tuple(slice(*bounds) for bounds in part))
            copies = [jax.device_put(block, device) for device in devices]
            jax.block_until_ready(copies)  # a transfer keeps `block` alive until done: wait, so they do not pile up
            shards += copies
            del block
        return jax.make_array_from_single_device_arrays(self.shape, sharding, shards)


def build_params(
    config: ModelConfig, source: TensorSource, dtype: Any, progress: bool = True, shardings: Shardings | None = None
) -> Params:
    """Reads every parameter of `config` from `source`, cast to `dtype`.

    Without `shardings`, each parameter lands whole on the default device. With
    `shardings` (the tree of `param_shapes(config, dtype)` with a
    `jax.sharding.Sharding` per leaf), each is laid out as its sharding says and
    this process reads only what its own devices hold (see the module docstring).
    Every tensor's presence and shape is checked before any data is read.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_shapes(config, dtype))
    parameters = [_Parameter.of(tuple(k.key for k in key_path), leaf, config.num_layers) for key_path, leaf in leaves]
    available = source.names()
    for parameter in parameters:
        parameter.check(source, available)
    placements = [None] * len(parameters) if shardings is None else treedef.flatten_up_to(shardings)
    out = []
    for parameter, sharding in tqdm(
        list(zip(parameters, placements)), desc="loading weights", unit="tensor", disable=not shows_progress(progress), leave=False
    ):
        if sharding is None:
            out.append(jax.device_put(parameter.read(source, (slice(None),) * len(parameter.shape))))
        else:
            out.append(parameter.place(source, sharding))
    return jax.tree_util.tree_unflatten(treedef, out)
