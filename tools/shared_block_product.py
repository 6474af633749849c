"""The product of a batch's attention rows with a shared block (a prefix every row attends to), timed two ways.

Usage: python tools/shared_block_product.py [--batch B] [--tokens T] [--slots S ...] [--repeats R]

A shared block's keys [kv_heads, d, s] and values [kv_heads, s, d] have no batch axis. `attend` multiplies them
with `_times_shared`: one matmul per key-value head over the rows of the whole batch. The other way is an einsum
that broadcasts the block over the batch ("bkqd,kds->bkqs", then "bkqs,ksd->bkqd"), which XLA:CPU runs slower.
Both products of one layer (scores, then the weighted sum of the values; float32) are compiled, checked to agree,
and timed in turns. Defaults: SmolLM2's attention (3 key-value heads of 3 query heads, head dim 64) on a score
batch of the anchor stage (32 rows of 70 tokens). Printed per slot count: each way's median milliseconds and the
einsum's time over the matmul's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.models.transformer import _times_shared


def products(times_block: Callable[[jax.Array, jax.Array], jax.Array]) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """Scores of the rows against the block's keys, softmax, the weighted sum of its values: one compiled function."""

    def both(query: jax.Array, key_t: jax.Array, value: jax.Array) -> jax.Array:
        weights = jax.nn.softmax(times_block(query, key_t) * query.shape[-1] ** -0.5, axis=-1)
        return times_block(weights, value)

    return jax.jit(both)


def broadcast_einsum(rows: jax.Array, shared: jax.Array) -> jax.Array:
    """rows [b, kv_heads, n, x] times shared [kv_heads, x, y] as one einsum with the block broadcast over b."""
    return jnp.einsum("bknx,kxy->bkny", rows.astype(jnp.float32), shared.astype(jnp.float32))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="rows per batch (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=70, help="query tokens per row (default: %(default)s)")
    parser.add_argument("--slots", type=int, nargs="+", default=[32, 111, 128], help="the shared block's sizes (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--group", type=int, default=3, help="query heads per key-value head (default: %(default)s)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed turns (default: %(default)s)")
    args = parser.parse_args(argv)
    ways = {"matmul per head": products(_times_shared), "broadcast einsum": products(broadcast_einsum)}
    generator = np.random.default_rng(0)
    for slots in args.slots:
        query = jnp.asarray(generator.standard_normal((args.batch, args.kv_heads, args.group * args.tokens, args.head_dim)), jnp.float32)
        key_t = jnp.asarray(generator.standard_normal((args.kv_heads, args.head_dim, slots)), jnp.float32)
        value = jnp.asarray(generator.standard_normal((args.kv_heads, slots, args.head_dim)), jnp.float32)
        results = [np.asarray(way(query, key_t, value)) for way in ways.values()]
        if not np.allclose(results[0], results[1], rtol=1e-4, atol=1e-5):
            raise SystemExit(f"{slots} slots: the two ways disagree by {np.abs(results[0] - results[1]).max():.2e}")
        taken = {name: [] for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                start = time.perf_counter()
                jax.block_until_ready(way(query, key_t, value))
                taken[name].append(time.perf_counter() - start)
        ratio = statistics.median(b / a for a, b in zip(*taken.values()))
        print(f"{slots} slots: " + ", ".join(f"{name} {1e3 * statistics.median(t):.2f} ms" for name, t in taken.items())
              + f"; einsum / matmul {ratio:.2f} (median over {args.repeats} turns)")


if __name__ == "__main__":
    main()
