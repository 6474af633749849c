"""What goes into the model and what is read out of it for DRO: input embeddings with a soft prompt spliced
in, and the final-norm state at the last position (the representation every stage works with)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, forward


def embed_tokens(params: Params, token_ids: jax.Array) -> jax.Array:
    """Input embeddings of `token_ids`, e.g. to splice a soft prompt in before `forward`."""
    return jnp.take(params["embed_tokens"]["weight"], token_ids, axis=0)


def insert_soft_prompt(embeds: jax.Array, soft_prompt: jax.Array, offsets: jax.Array) -> jax.Array:
    """Writes soft_prompt [N, hidden] into embeds [b, t, hidden] at rows' `offsets` [b] (-1: none).

    A gather plus a select, so the gradient with respect to the soft prompt is
    the sum over every row and position it fills.
    """
    count = soft_prompt.shape[0]
    relative = jnp.arange(embeds.shape[1])[None, :] - offsets[:, None]  # [b, t]
    inside = (relative >= 0) & (relative < count) & (offsets[:, None] >= 0)
    rows = soft_prompt.astype(embeds.dtype)[jnp.clip(relative, 0, count - 1)]
    return jnp.where(inside[..., None], rows, embeds)


def input_embeddings(params: Params, token_ids: jax.Array, soft_prompt: jax.Array | None = None, offsets: jax.Array | None = None) -> jax.Array:
    """Token embeddings [b, t, hidden], with the soft prompt in place when one is given."""
    embeds = embed_tokens(params, token_ids)
    if soft_prompt is None:
        return embeds
    return insert_soft_prompt(embeds, soft_prompt, offsets)


def final_states(
    params: Params,
    config: ModelConfig,
    token_ids: jax.Array,
    attention_mask: jax.Array,
    soft_prompt: jax.Array | None = None,
    soft_offsets: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """[batch, hidden] float32 states after the final norm at the last (left-padded) position.

    Pure, so the DRO loss differentiates it with respect to `soft_prompt`.
    """
    embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
    out = forward(params, config, inputs_embeds=embeds, attention_mask=attention_mask, remat=remat)
    return out.last_hidden_state[:, -1].astype(jnp.float32)
