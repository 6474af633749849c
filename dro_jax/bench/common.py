"""Shared pieces of the benchmarks: timing and work counts (the device and its limits: `dro_jax.bench.device`; the
PyTorch models come from `dro_jax.parity`)."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeats` calls (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())  # a result still being computed counts
        times.append(time.perf_counter() - start)
    return min(times)


def layer_matmuls_gflops(config, rows: int, dtype: str = "float32", repeats: int = 3) -> float:
    """Rate of the model's own projections alone (all layers, `rows` tokens, no attention or norms).

    Small inner dimensions run below the square-matmul peak, so this is the
    practical ceiling for a forward pass of this model at this batch shape.
    """
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = [(q_dim, hidden), (kv_dim, hidden), (kv_dim, hidden), (hidden, q_dim), (inter, hidden), (inter, hidden), (hidden, inter)]
    keys = jax.random.split(jax.random.key(0), len(shapes) + 1)
    weights = [(jax.random.normal(k, (config.num_layers, *shape)) * 0.02).astype(dtype) for k, shape in zip(keys, shapes)]
    x = jax.random.normal(keys[-1], (rows, hidden), dtype)

    @jax.jit
    def projections(x, weights):
        def layer(carry, w):
            h, kv_total = carry
            q, k, v, o, gate, up, down = w
            kv_total = kv_total + (h @ k.T).mean() + (h @ v.T).mean()
            return (h + (h @ q.T) @ o.T + ((h @ gate.T) * (h @ up.T)) @ down.T, kv_total), None

        return jax.lax.scan(layer, (x, jnp.zeros((), dtype)), weights)[0]

    jax.block_until_ready(projections(x, weights))
    seconds = best_of(repeats, lambda: jax.block_until_ready(projections(x, weights)))
    flops = 2.0 * rows * config.num_layers * sum(a * b for a, b in shapes)
    return flops / seconds / 1e9
