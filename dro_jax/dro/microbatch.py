"""Gradient accumulation by microbatches, inside the loss: the same update as the whole batch, less memory.

A training loss is "each row through the model" followed by a cheap
combination of the rows' outputs (means over rows, per-set targets). Only
the first part needs the activations, so only it is split: the rows run
`size` at a time under `lax.map`, each chunk rematerialised in the backward
pass (`jax.checkpoint`), and the combination sees every row's output at
once. The loss and its gradient are therefore those of the whole batch, with
the activations of one microbatch alive at a time.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from dro_jax.common.errors import DroJaxError
from dro_jax.parallel.sharding import constrain


def check_microbatch(microbatch: int | None, rows: int, split: int) -> None:
    """`microbatch` must divide the (padded) batch of `rows` and be a multiple of the batch's split over devices."""
    if microbatch is None or microbatch >= rows:
        return
    if microbatch < 1 or rows % microbatch or microbatch % split:
        raise DroJaxError(
            f"microbatch {microbatch} must divide the batch of {rows} rows (batch size rounded up to fill the devices) "
            f"and be a multiple of the {split} ways the batch is split over devices"
        )


def map_microbatches(fn: Callable[[Any], Any], rows: Any, size: int | None) -> Any:
    """fn(rows) with every leaf of `rows` [R, ...], computed `size` rows at a time; outputs [R, ...] in row order.

    Row r goes to chunk r % (R / size): each device's contiguous block of rows
    is spread over every chunk, so no row changes device.
    """
    total = jax.tree.leaves(rows)[0].shape[0]
    if size is None or size >= total:
        return fn(rows)
    count = total // size

    def split(x: jax.Array) -> jax.Array:
        return constrain(jnp.swapaxes(x.reshape(size, count, *x.shape[1:]), 0, 1), (None, "batch"))

    def join(y: jax.Array) -> jax.Array:
        return constrain(jnp.swapaxes(y, 0, 1).reshape(total, *y.shape[2:]), ("batch",))

    return jax.tree.map(join, jax.lax.map(jax.checkpoint(fn), jax.tree.map(split, rows)))
