"""What goes into the model and what is read out of it for DRO: input embeddings with a soft prompt spliced
in, the shared prefix of a batch, and the final-norm state at the last position (the representation every
stage works with).

Every input here is `[template head + system prompt][query][assistant header]`,
and within a batch the first part is the same for every row. A batch is
therefore laid out as a `SharedPrefix` of p tokens, run once at batch 1 and
kept as a batch-1 KV cache, and the rows' own parts, left-padded to t tokens,
at positions p, p + 1, ... counted from their first real token. Every row
attends to the whole prefix, so the result is that of running each full
sequence alone; a batch without a shared part has p = 0.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import PREFIX_CHUNK, KVCache, Params, compute_logits, forward, positions_from_mask


class SharedPrefix(NamedTuple):
    """The tokens every row of a batch starts with, and where the soft prompt starts in them (-1: not there).

    `length` (None: all of `token_ids`) counts the real tokens when
    `token_ids` is padded at the end (see `padded_prefix`): prefixes of
    different lengths (the prompt settings) then share one compiled shape.
    """

    token_ids: jax.Array  # [p] int32
    soft_offset: jax.Array  # [] int32
    length: jax.Array | None = None  # [] int32

    @property
    def tokens(self) -> np.ndarray:
        """The real tokens, without the padding (host values)."""
        ids = np.asarray(self.token_ids)
        return ids if self.length is None else ids[: int(self.length)]


# A shared prefix is padded to a multiple of this many tokens: one shape for the system prompts of a run (chat
# templates and safety prompts are mostly under 128 tokens). The padding costs little: the prefix is run
# PREFIX_CHUNK slots at a time up to its last real token (a 24-token chat template costs one 32-token forward, not
# a 128-token one), and attention reads it only up to the narrowest of 32, 64 or 128 slots that holds its tokens
# (`prefix_widths`). A multiple of PREFIX_CHUNK.
PREFIX_BUCKET = 128


def padded_prefix(token_ids: np.ndarray, soft_offset: int, bucket: int | None = PREFIX_BUCKET) -> SharedPrefix:
    """`token_ids` [p] (host values) padded at the end to a multiple of `bucket`, with their count; None: as they
    are (where nothing would share the shape, padding only adds attention work)."""
    if bucket is None:
        return SharedPrefix(np.asarray(token_ids, np.int32), np.int32(soft_offset))
    length = len(token_ids)
    padded = np.zeros(-(-length // bucket) * bucket, np.int32)
    padded[:length] = token_ids
    return SharedPrefix(padded, np.int32(soft_offset), np.int32(length))


class ModelInputs(NamedTuple):
    """One batch as the model functions take it: the rows' own parts (split over devices) and what they share."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_prompt: jax.Array | None = None  # [N, hidden]
    soft_offsets: jax.Array | None = None  # [b] where the soft prompt starts in a row's part (-1: in the prefix)
    prefix: SharedPrefix | KVCache | None = None  # its tokens, or their keys and values already computed


def embed_tokens(params: Params, token_ids: jax.Array) -> jax.Array:
    """Input embeddings of `token_ids`, e.g. to splice a soft prompt in before `forward`."""
    return jnp.take(params["embed_tokens"]["weight"], token_ids, axis=0)


def insert_soft_prompt(embeds: jax.Array, soft_prompt: jax.Array, offsets: jax.Array) -> jax.Array:
    """Writes soft_prompt [N, hidden] into embeds [b, t, hidden] at rows' `offsets` [b] (-1: none).

    A gather plus a select, so the gradient with respect to the soft prompt is
    the sum over every row and position it fills. The gather reads the prompt
    in its own dtype and casts after it, so that in a half-precision model the
    gradient is summed (over rows and, on a mesh, across devices) in float32.
    """
    count = soft_prompt.shape[0]
    relative = jnp.arange(embeds.shape[1])[None, :] - offsets[:, None]  # [b, t]
    inside = (relative >= 0) & (relative < count) & (offsets[:, None] >= 0)
    rows = soft_prompt[jnp.clip(relative, 0, count - 1)].astype(embeds.dtype)
    return jnp.where(inside[..., None], rows, embeds)


def input_embeddings(params: Params, token_ids: jax.Array, soft_prompt: jax.Array | None = None, offsets: jax.Array | None = None) -> jax.Array:
    """Token embeddings [b, t, hidden], with the soft prompt in place when one is given."""
    embeds = embed_tokens(params, token_ids)
    if soft_prompt is None:
        return embeds
    return insert_soft_prompt(embeds, soft_prompt, offsets)


def prefix_cache(
    params: Params,
    config: ModelConfig,
    prefix: SharedPrefix | KVCache | None,
    soft_prompt: jax.Array | None = None,
    remat: bool = False,
) -> KVCache | None:
    """The prefix's keys and values at batch 1 (None without a prefix, or for an empty one; a `KVCache` is
    a prefix computed before, e.g. once for every batch of a pass, and is returned as it is).

    Differentiable: the gradient of every row's output reaches a soft prompt
    inside the prefix through these keys and values, summed over the rows.
    """
    if isinstance(prefix, KVCache):
        return prefix
    if prefix is None or prefix.token_ids.shape[0] == 0:
        return None
    slots = prefix.token_ids.shape[0]
    embeds = input_embeddings(params, prefix.token_ids[None], soft_prompt, prefix.soft_offset[None])
    cache = KVCache.zeros(config, 1, slots, jnp.float32)
    everywhere = jnp.ones((1, slots), jnp.int32)
    if prefix.length is None or slots % PREFIX_CHUNK:
        out = forward(
            params, config, inputs_embeds=embeds, attention_mask=everywhere, positions=jnp.arange(slots)[None],
            cache=cache, cache_index=0, remat=remat,
        )
        return out.cache.replace(length=prefix.length)
    # Padded: chunk by chunk into the cache, skipping the chunks of padding only (causal: the padding inside the
    # last real chunk changes none of the real tokens' keys and values, and no reader looks past `length`).
    chunks = embeds.reshape(slots // PREFIX_CHUNK, 1, PREFIX_CHUNK, embeds.shape[-1])

    def fill(cache: KVCache, chunk_and_start: tuple[jax.Array, jax.Array]) -> tuple[KVCache, None]:
        chunk, start = chunk_and_start

        def run(cache: KVCache) -> KVCache:
            positions = (start + jnp.arange(PREFIX_CHUNK))[None]
            return forward(
                params, config, inputs_embeds=chunk, attention_mask=everywhere, positions=positions,
                cache=cache, cache_index=start, remat=remat,
            ).cache

        return jax.lax.cond(start < prefix.length, run, lambda unchanged: unchanged, cache), None

    cache, _ = jax.lax.scan(fill, cache, (chunks, jnp.arange(0, slots, PREFIX_CHUNK)))
    return cache.replace(length=prefix.length)


def row_positions(attention_mask: jax.Array, prefix: SharedPrefix | KVCache | None) -> jax.Array:
    """Positions of the rows' own tokens [b, t]: they continue the prefix, counting real tokens only."""
    if isinstance(prefix, KVCache):
        start = prefix.filled
    else:
        start = 0 if prefix is None else prefix.token_ids.shape[0] if prefix.length is None else prefix.length
    return start + positions_from_mask(attention_mask)


def final_states(params: Params, config: ModelConfig, inputs: ModelInputs, remat: bool = False) -> jax.Array:
    """[batch, hidden] float32 states after the final norm at the last (left-padded) position of each row.

    `inputs.token_ids` [b, t] are the rows' own parts when a `prefix` is given
    (the soft prompt may sit in the prefix or in the rows). Pure, so the DRO
    loss differentiates it with respect to `inputs.soft_prompt`.
    """
    token_ids, attention_mask, soft_prompt, soft_offsets, prefix = inputs
    shared = prefix_cache(params, config, prefix, soft_prompt, remat)
    embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
    positions = row_positions(attention_mask, prefix)
    out = forward(params, config, inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, prefix=shared, remat=remat)
    return out.last_hidden_state[:, -1].astype(jnp.float32)


def continuation_nll(
    params: Params, config: ModelConfig, inputs: ModelInputs, continuation_ids: jax.Array, continuation_mask: jax.Array, remat: bool = False
) -> tuple[jax.Array, jax.Array]:
    """([b] summed negative log-likelihood of each row's continuation, [b, hidden] float32 final states at the
    rows' last prompt position), teacher-forced in one pass.

    The prompts [b, t] are left-padded like `final_states`' rows; each row's
    continuation [b, c] follows its last prompt token, right-padded
    (`continuation_mask` 0 on padding, which is never scored). Pure, so a loss
    differentiates it with respect to `inputs.soft_prompt`.
    """
    token_ids, attention_mask, soft_prompt, soft_offsets, prefix = inputs
    length = token_ids.shape[1]
    ids = jnp.concatenate([token_ids, continuation_ids], axis=1)
    mask = jnp.concatenate([attention_mask, continuation_mask.astype(attention_mask.dtype)], axis=1)
    shared = prefix_cache(params, config, prefix, soft_prompt, remat)
    embeds = input_embeddings(params, ids, soft_prompt, soft_offsets)
    out = forward(params, config, inputs_embeds=embeds, attention_mask=mask, positions=row_positions(mask, prefix), prefix=shared, remat=remat)
    hidden = out.last_hidden_state
    logits = compute_logits(params, config, hidden[:, length - 1 : -1])  # position j predicts token j + 1
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), continuation_ids[..., None], axis=-1)[..., 0]
    nll = -jnp.sum(jnp.where(continuation_mask > 0, log_probs, 0.0), axis=1)
    return nll, hidden[:, length - 1].astype(jnp.float32)
