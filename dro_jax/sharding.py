"""Data parallelism with `jax.sharding`: the batch is split over devices, everything else replicated.

`jit` on arrays placed this way compiles one SPMD program for all devices
(the current form of `pmap`); reductions over the batch become cross-device
sums, so results match a single device up to float reduction order.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh over all (or the given) devices."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Splits every leaf's first axis over the mesh; its length must be a multiple of the device count."""
    return jax.device_put(tree, batch_sharded(mesh))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the device count that holds `batch_size` rows."""
    devices = mesh.devices.size
    return -(-batch_size // devices) * devices
