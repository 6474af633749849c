"""Turns named checkpoint tensors into the model's parameter tree.

Every checkpoint format is reduced to a `TensorSource` that hands out one
tensor at a time under its Hugging Face name. Layers are stacked into a host
buffer of the target dtype one parameter at a time, moved to the device, and
the buffer dropped, so at most one stacked parameter exists twice.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dro_jax.common.errors import DroJaxError
from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, param_shapes


class TensorSource(Protocol):
    """A checkpoint seen as HF-named float tensors."""

    description: str

    def names(self) -> set[str]: ...

    def read(self, name: str) -> np.ndarray: ...


def hf_tensor_name(path: tuple[str, ...], layer: int | None) -> str:
    """HF name of a parameter: ("layers", "mlp", "up_proj", "weight"), 3 -> model.layers.3.mlp.up_proj.weight."""
    if path[0] == "lm_head":
        return "lm_head.weight"
    if layer is None:
        return "model." + ".".join(path)
    return f"model.layers.{layer}." + ".".join(path[1:])


def build_params(config: ModelConfig, source: TensorSource, dtype: Any, progress: bool = True) -> Params:
    """Reads every parameter of `config` from `source`, cast to `dtype`, onto the default device."""
    shapes = param_shapes(config, dtype)
    available = source.names()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for key_path, shape in tqdm(leaves, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        path = tuple(k.key for k in key_path)
        layers = range(config.num_layers) if path[0] == "layers" else [None]
        buffer = np.empty(shape.shape, dtype=shape.dtype)
        for layer in layers:
            name = hf_tensor_name(path, layer)
            if name not in available:
                raise DroJaxError(f"{source.description}: tensor {name!r} is missing")
            tensor = source.read(name)
            target = buffer if layer is None else buffer[layer]
            if tensor.shape != target.shape:
                raise DroJaxError(
                    f"{source.description}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the config implies {tuple(target.shape)}"
                )
            target[...] = tensor
        out.append(jnp.asarray(buffer))
        del buffer
    return jax.tree_util.tree_unflatten(treedef, out)
