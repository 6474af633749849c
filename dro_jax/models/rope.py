"""Rotary position embeddings in the rotate-half layout that HF checkpoints use."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dro_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, with `linear` or `llama3` scaling applied."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    # llama3: long wavelengths are slowed down by `factor`, short ones are kept,
    # and the band in between is interpolated smoothly.
    context = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    slow_band = wavelength > context / scaling.low_freq_factor
    fast_band = wavelength < context / scaling.high_freq_factor
    scaled = np.where(slow_band, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    middle = ~slow_band & ~fast_band
    return np.where(middle, blended, scaled).astype(np.float32)


def rotary_tables(config: ModelConfig, positions: jnp.ndarray, dtype: jnp.dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables of shape [batch, seq, head_dim] for integer `positions` [batch, seq]."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x` [batch, seq, heads..., head_dim]; cos/sin are [batch, seq, head_dim]."""
    extra_axes = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra_axes + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra_axes + sin.shape[2:])
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
