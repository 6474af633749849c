"""Batched generation: one prefill, then a KV-cache decode loop compiled as a `lax.while_loop`.

Prompts are left-padded, so every row's next token goes to the same cache
slot; positions count real tokens only. Sampling follows the usual order
(temperature, then top-k, then top-p, over the top-k survivors only), and
every row draws from its own key, so a sample depends on the seed and its own
index, not on batching.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.inference.sampling import SamplingConfig
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import ModelInputs, embed_tokens, input_embeddings, prefix_cache
from dro_jax.models.transformer import KVCache, Params, compute_logits, forward, positions_from_mask


def candidates(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> tuple[jax.Array, jax.Array]:
    """(scaled logits [b, c], their token ids [b, c]) of the tokens a sample may pick, -inf where top-p drops one.

    Top-k first: only its k survivors are sorted for top-p (k = 50 against a
    49k vocabulary), which is what keeps sampling near the cost of greedy
    decoding; without top-k the whole vocabulary is sorted.
    """
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        scores, ids = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))  # sorted, highest first
    elif top_p < 1.0:
        ids = jnp.argsort(-logits, axis=-1)
        scores = jnp.take_along_axis(logits, ids, axis=-1)
    else:
        return logits, jnp.broadcast_to(jnp.arange(logits.shape[-1]), logits.shape)
    if top_p < 1.0:
        probs = jax.nn.softmax(scores, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        scores = jnp.where(mass_before < top_p, scores, -jnp.inf)  # the smallest head of the distribution that reaches top_p
    return scores, ids


def next_tokens(logits: jax.Array, row_keys: jax.Array, step: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scores, ids = candidates(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, step)
    choice = jax.vmap(jax.random.categorical)(keys, scores)
    return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@flax.struct.dataclass
class DecodeState:
    """What the decode loop carries from one new token to the next."""

    step: jax.Array  # [] tokens decoded so far
    tokens: jax.Array  # [b, max_new] the new tokens, pad after a row's stop token
    done: jax.Array  # [b] rows that have made a stop token
    cache: KVCache
    logits: jax.Array  # [b, vocab] the next token's logits


@functools.partial(jax.jit, static_argnames=("config", "sampling"))
def _generate(
    params: Params, config: ModelConfig, inputs: ModelInputs, stop_ids: jax.Array, row_keys: jax.Array, pad_id: jax.Array, sampling: SamplingConfig
) -> tuple[jax.Array, jax.Array]:
    """New tokens [b, max_new] (pad after a stop token) and their counts [b], stop token included.

    The inputs are left-padded (the rows' own parts after `inputs.prefix`,
    which runs once into a batch-1 cache they continue); any of stop_ids [n]
    ends a row (n may be 0); row_keys [b] are PRNG keys, one per row.
    """
    prompt_mask = inputs.attention_mask
    prefix = prefix_cache(params, config, inputs.prefix, inputs.soft_prompt)
    prompt_embeds = input_embeddings(params, inputs.token_ids, inputs.soft_prompt, inputs.soft_offsets)
    batch, prompt_len = prompt_mask.shape
    max_new = sampling.max_new_tokens
    start = 0 if prefix is None else prefix.filled
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, max_new), prompt_mask.dtype)], axis=1)
    cache = KVCache.zeros(config, batch, prompt_len + max_new, params["embed_tokens"]["weight"].dtype)
    prefill = forward(
        params, config, inputs_embeds=prompt_embeds, attention_mask=key_mask,
        positions=start + positions_from_mask(prompt_mask), cache=cache, cache_index=0, prefix=prefix,
    )
    logits = compute_logits(params, config, prefill.last_hidden_state[:, -1:])[:, 0]
    prompt_lengths = prompt_mask.sum(axis=1).astype(jnp.int32)
    is_stop = jnp.any(jnp.arange(logits.shape[-1])[:, None] == stop_ids[None, :], axis=1)  # ids outside the vocab never stop

    def keep_going(state: DecodeState) -> jax.Array:
        return (state.step < max_new) & ~jnp.all(state.done)

    def decode(state: DecodeState) -> DecodeState:
        logits = jnp.where((state.step < sampling.min_new_tokens) & is_stop, -jnp.inf, state.logits)
        token = jnp.where(state.done, pad_id, next_tokens(logits, row_keys, state.step, sampling))
        out = forward(
            params, config, inputs_embeds=embed_tokens(params, token[:, None]), attention_mask=key_mask,
            positions=(start + prompt_lengths + state.step)[:, None], cache=state.cache, cache_index=prompt_len + state.step, prefix=prefix,
        )
        return DecodeState(
            step=state.step + 1, tokens=state.tokens.at[:, state.step].set(token), done=state.done | is_stop[token],
            cache=out.cache, logits=compute_logits(params, config, out.last_hidden_state)[:, 0],
        )

    first = DecodeState(jnp.int32(0), jnp.full((batch, max_new), pad_id, jnp.int32), jnp.zeros(batch, bool), prefill.cache, logits)
    tokens = jax.lax.while_loop(keep_going, decode, first).tokens
    lengths = jnp.where(is_stop[tokens], jnp.arange(max_new)[None] + 1, max_new).min(axis=1)
    return tokens, lengths


def generate_tokens(
    params: Params,
    config: ModelConfig,
    inputs: ModelInputs,
    stop_ids: list[int],
    sampling: SamplingConfig,
    row_keys: jax.Array | None = None,
    pad_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Prefill and decode, compiled: left-padded ids [b, t] (the rows' own parts after `inputs.prefix`, when
    given), an optional soft prompt in the prefix or in the rows, decoded as `sampling` says. Returns the new
    tokens [b, max_new] and their counts [b] as soon as the work is dispatched: they are jax arrays still being
    computed (reading them, e.g. `np.asarray`, waits), so a caller can send the next batch meanwhile."""
    if row_keys is None:
        row_keys = jax.random.split(jax.random.key(0), inputs.token_ids.shape[0])
    stops = np.asarray(list(stop_ids), np.int32).reshape(-1)  # host values go into the compiled call as they are
    return _generate(params, config, inputs, stops, row_keys, np.int32(pad_id), sampling)
