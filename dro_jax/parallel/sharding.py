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

from dro_jax.common.errors import DroJaxError

DATA_AXIS = "data"


def data_mesh(devices: list | None = None) -> Mesh:
    """A one-axis mesh over all (or the given) devices."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def local_mesh(num_devices: int | None = None) -> Mesh:
    """A data mesh over this process's first `num_devices` devices (default: all of them).

    Local, so that with several processes each one runs its own share of the work.
    """
    devices = jax.local_devices()
    if num_devices is not None and not 1 <= num_devices <= len(devices):
        raise DroJaxError(f"asked for {num_devices} devices, but this process has {len(devices)}")
    return data_mesh(devices[:num_devices])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """A copy of every leaf on every device of the mesh (no transfer if already there); without a mesh, `tree` as it is."""
    return tree if mesh is None else jax.device_put(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Splits every leaf's first axis over the mesh (a multiple of the device count); without a mesh, `tree` as it is."""
    return tree if mesh is None else jax.device_put(tree, batch_sharded(mesh))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the device count that holds `batch_size` rows."""
    devices = mesh.devices.size
    return -(-batch_size // devices) * devices


def rows_per_batch(batch_size: int, num_rows: int, mesh: Mesh | None = None) -> int:
    """Rows per batch for `num_rows` rows in batches of at most `batch_size`: spread evenly over as few
    batches as that allows, so the last batch is not mostly filler (200 rows at 32 -> 7 batches of 29);
    with a mesh, rounded up to fill every device."""
    batches = -(-num_rows // max(batch_size, 1))
    rows = -(-num_rows // max(batches, 1))
    return rows if mesh is None else padded_batch_size(rows, mesh)
