"""Placing arrays on a mesh with `jax.sharding`: batches split over the batch axes, weights by logical axes.

`jit` on arrays placed this way compiles one SPMD program for all devices
(the current form of `pmap`); reductions over the batch become cross-device
sums, so results match a single device up to float reduction order.

Arrays name their dimensions with logical axes ("batch", "embed", "heads",
"kv_heads", "mlp", "vocab"; None for a dimension never split); `AXIS_RULES`
maps those onto the mesh axes of `dro_jax.parallel.mesh`. A dimension whose
units (heads, rows, ...) do not divide evenly over its mesh axes stays whole:
the result is the same, only less of it is split, so `whole_dimensions` names
them for a warning, as `padded_batch_size` warns of batches mostly filler.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dro_jax.parallel.distributed import is_writer
from dro_jax.parallel.mesh import BATCH_AXES, batch_devices

LOG = logging.getLogger(__name__)
PADDING_WARNED_ABOVE = 0.25  # share of a batch that is filler rows

AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH_AXES,
    "embed": ("fsdp",),
    "heads": ("model",),
    "kv_heads": ("model",),
    "mlp": ("model",),
    "vocab": ("model",),
}


def logical_spec(mesh_shape: Mapping[str, int], axes: Sequence[str | None], units: Sequence[int]) -> PartitionSpec:
    """The partition of an array whose dimensions have logical `axes` and divide into `units` (e.g. heads) each.

    A mesh axis splits at most one dimension; axes of size 1 are left out, so
    a one-device mesh gives the fully replicated spec.
    """
    spec: list[Any] = []
    used: set[str] = set()
    for name, count in zip(axes, units):
        mesh_axes = tuple(a for a in AXIS_RULES.get(name or "", ()) if mesh_shape.get(a, 1) > 1 and a not in used)
        ways = math.prod(mesh_shape[a] for a in mesh_axes)
        if not mesh_axes or count % ways:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def whole_dimensions(mesh_shape: Mapping[str, int], axes: Sequence[str | None], units: Sequence[int]) -> list[tuple[str, int, str]]:
    """The dimensions `logical_spec` leaves whole although their mesh axes have devices to split them over:
    (logical axis, its units, the mesh axes as "model=4")."""
    whole = []
    for name, count in zip(axes, units):
        mesh_axes = [a for a in AXIS_RULES.get(name or "", ()) if mesh_shape.get(a, 1) > 1]
        if mesh_axes and count % math.prod(mesh_shape[a] for a in mesh_axes):
            whole.append((name, count, ",".join(f"{a}={mesh_shape[a]}" for a in mesh_axes)))
    return whole


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """`message` as a warning line on stderr, once per process run, from process 0 only."""
    if is_writer():
        LOG.warning("dro-jax: warning: %s", message)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` constrained to the partition its logical `axes` give on the mesh being traced for (see `on_mesh`);
    unchanged outside one. Used on activations, so GSPMD keeps the batch split and gathers weights instead."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(dict(mesh.shape), axes, x.shape))


def on_mesh(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """The context to call jitted model code in: it traces with the mesh's activation constraints."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The first dimension split over the batch axes."""
    return NamedSharding(mesh, logical_spec(dict(mesh.shape), ("batch",), (batch_devices(mesh),)))


def place(tree: Any, shardings: Any) -> Any:
    """Every leaf of `tree` on its sharding (a matching tree, or one sharding for all leaves).

    Works across processes: a host value (the same on every process) becomes
    a global array of which each process fills only its own devices' parts;
    an array already on the mesh is resharded in place.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda leaf: _put(leaf, shardings), tree)
    return jax.tree.map(_put, tree, shardings)


def _put(leaf: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    if sharding.is_fully_addressable or (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable):
        return jax.device_put(leaf, sharding)
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # PRNG keys travel as their integer data
        return jax.random.wrap_key_data(_put(jax.random.key_data(leaf), sharding), impl=jax.random.key_impl(leaf))
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x: Any) -> np.ndarray:
    """A numpy copy of an array; of one spread over several processes, the whole of it on every process
    (so every process must call it at the same point)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental.multihost_utils import process_allgather

        return np.asarray(process_allgather(x, tiled=True))
    return np.asarray(x)


def tree_to_host(tree: Any) -> Any:
    """`to_host` of every array in `tree`, the copies of this process's own arrays started together, so that the
    host waits for the device once per tree (a training step's metrics, a batch's outputs), not once per array."""
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
            if leaf.is_fully_addressable:
                leaf.copy_to_host_async()
            elif leaf.sharding.is_fully_replicated:  # what `to_host` reads of it: this process's copy
                leaf.addressable_data(0).copy_to_host_async()
    return jax.tree.map(to_host, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """A copy of every leaf on every device of the mesh (no transfer if already there); without a mesh, `tree` as it is."""
    return tree if mesh is None else place(tree, replicated(mesh))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Splits every leaf's first axis over the batch axes (a multiple of their size); without a mesh, `tree` as it is."""
    return tree if mesh is None else place(tree, batch_sharded(mesh))


def padded_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The smallest multiple of the batch's split that holds `batch_size` rows (a warning where over a quarter
    of it would be filler: the devices would spend that share of their time on it)."""
    ways = batch_devices(mesh)
    padded = -(-batch_size // ways) * ways
    if padded - batch_size > PADDING_WARNED_ABOVE * padded:
        warn_once(f"batches of {batch_size} rows are padded to {padded} to split {ways} ways: "
                  f"{(padded - batch_size) / padded:.0%} of every batch is filler; a batch size that is a multiple of {ways} avoids it")
    return padded


def rows_per_batch(batch_size: int, num_rows: int, mesh: Mesh | None = None) -> int:
    """Rows per batch for `num_rows` rows in batches of at most `batch_size`: spread evenly over as few
    batches as that allows, so the last batch is not mostly filler (200 rows at 32 -> 7 batches of 29);
    with a mesh, rounded up to fill every batch split."""
    batches = -(-num_rows // max(batch_size, 1))
    rows = -(-num_rows // max(batches, 1))
    return rows if mesh is None else padded_batch_size(rows, mesh)
