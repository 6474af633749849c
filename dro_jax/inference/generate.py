"""Batched generation: one prefill, then a KV-cache decode loop compiled as a `lax.while_loop`.

Prompts are left-padded, so every row's next token goes to the same cache
slot; positions count real tokens only. Sampling follows the usual order
(temperature, then top-k, then top-p), and every row draws from its own key,
so a sample depends on the seed and its own index, not on batching.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.inference.sampling import SamplingConfig
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import embed_tokens, input_embeddings
from dro_jax.models.transformer import KVCache, Params, compute_logits, forward, positions_from_mask


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scaled logits [b, v] with the tokens outside top-k / top-p set to -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p  # the smallest head of the distribution that reaches top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def next_tokens(logits: jax.Array, row_keys: jax.Array, step: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def generate_from_embeddings(
    params: Params,
    config: ModelConfig,
    prompt_embeds: jax.Array,
    prompt_mask: jax.Array,
    stop_ids: jax.Array,
    row_keys: jax.Array,
    pad_id: jax.Array,
    sampling: SamplingConfig,
) -> tuple[jax.Array, jax.Array]:
    """New tokens [b, max_new] (pad after a stop token) and their counts [b], stop token included.

    prompt_embeds [b, p, hidden] and prompt_mask [b, p] are left-padded; any of
    stop_ids [n] ends a row (n may be 0); row_keys [b] are PRNG keys, one per row.
    """
    batch, prompt_len = prompt_mask.shape
    max_new = sampling.max_new_tokens
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new), prompt_mask.dtype)], axis=1)
    cache = KVCache.zeros(config, batch, prompt_len + max_new, params["embed_tokens"]["weight"].dtype)
    prefill = forward(
        params, config, inputs_embeds=prompt_embeds, attention_mask=key_mask,
        positions=positions_from_mask(prompt_mask), cache=cache, cache_index=0,
    )
    logits = compute_logits(params, config, prefill.last_hidden_state[:, -1:])[:, 0]
    prompt_lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
    is_stop = jnp.any(jnp.arange(logits.shape[-1])[:, None] == stop_ids[None, :], axis=1)  # ids outside the vocab never stop

    def keep_going(state):
        step, _, done, _, _ = state
        return (step < max_new) & ~jnp.all(done)

    def decode(state):
        step, tokens, done, cache, logits = state
        logits = jnp.where((step < sampling.min_new_tokens) & is_stop, -jnp.inf, logits)
        token = jnp.where(done, pad_id, next_tokens(logits, row_keys, step, sampling))
        tokens = tokens.at[:, step].set(token)
        done = done | is_stop[token]
        out = forward(
            params, config, inputs_embeds=embed_tokens(params, token[:, None]), attention_mask=key_mask,
            positions=(prompt_lengths + step)[:, None], cache=cache, cache_index=prompt_len + step,
        )
        return step + 1, tokens, done, out.cache, compute_logits(params, config, out.last_hidden_state)[:, 0]

    tokens = jnp.full((batch, max_new), pad_id, jnp.int32)
    state = (jnp.int32(0), tokens, jnp.zeros(batch, bool), prefill.cache, logits)
    _, tokens, _, _, _ = jax.lax.while_loop(keep_going, decode, state)
    lengths = jnp.where(is_stop[tokens], jnp.arange(max_new)[None] + 1, max_new).min(axis=1)
    return tokens, lengths


def generate_tokens(
    params: Params,
    config: ModelConfig,
    token_ids: np.ndarray,
    attention_mask: np.ndarray,
    stop_ids: list[int],
    sampling: SamplingConfig,
    row_keys: jax.Array | None = None,
    pad_id: int = 0,
    soft_prompt: jax.Array | None = None,
    soft_offsets: jax.Array | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token-id wrapper around `generate_from_embeddings` (left-padded ids, optional soft prompt)."""
    if row_keys is None:
        row_keys = jax.random.split(jax.random.key(0), token_ids.shape[0])
    embeds = input_embeddings(params, jnp.asarray(token_ids), soft_prompt, soft_offsets)
    tokens, lengths = generate_from_embeddings(
        params, config, embeds, jnp.asarray(attention_mask),
        jnp.asarray(list(stop_ids), jnp.int32).reshape(-1), row_keys, jnp.int32(pad_id), sampling,
    )
    return np.asarray(tokens), np.asarray(lengths)
