"""Teacher-forced likelihood of given replies: how well a prompt setting keeps the model's own answers.

Each reply is appended to its chat-formatted query and the model reads the
whole sequence once; the score is the mean negative log-likelihood per reply
token (nats), over the whole reply and over its first `OPENING_TOKENS` tokens,
where a prompt's damage shows first (a reply that opens off course and then
returns to the reference's words scores well on the whole alone). The same
reply scored under two settings tells how far one setting moved the model's
answer distribution away from the other's, with no judge and no generation.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.batched import Batching, PassInfo, run_batched
from dro_jax.inference.encoding import EncodedQueries
from dro_jax.inference.padding import PaddedBatch, bucket_length
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import ModelInputs, input_embeddings, prefix_cache, row_positions
from dro_jax.models.transformer import Params, compute_logits, forward
from dro_jax.parallel.sharding import on_mesh, shard_batch

OPENING_TOKENS = 8


@functools.partial(jax.jit, static_argnames=("config",))
def token_log_likelihoods(
    params: Params,
    config: ModelConfig,
    inputs: ModelInputs,
    scored: jax.Array,
) -> jax.Array:
    """[b, r] log p(token_ids[:, j] | everything before it) for the rows' last r tokens j, where `scored` [b, r]
    is set, else 0.

    Rows are left-padded (the rows' own parts after `prefix`, when given), so the replies are their last tokens:
    only these positions go through the vocabulary projection. The logits are [b, r, vocab], not [b, t, vocab]
    (batch 32 of 400 tokens on a 128k vocabulary: 6.6 GB of float32 for the whole rows). A row's first token
    is never scored (nothing of the row precedes it).
    """
    token_ids, attention_mask, soft_prompt, soft_offsets, prefix = inputs
    shared = prefix_cache(params, config, prefix, soft_prompt)
    embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
    out = forward(
        params, config, inputs_embeds=embeds, attention_mask=attention_mask,
        positions=row_positions(attention_mask, prefix), prefix=shared,
    )
    tail = min(scored.shape[1], token_ids.shape[1] - 1)
    logits = compute_logits(params, config, out.last_hidden_state[:, -tail - 1 : -1])  # position j predicts token j + 1
    picked = jnp.take_along_axis(logits, token_ids[:, -tail:, None], axis=-1)[..., 0]
    log_probs = jnp.pad(picked - jax.nn.logsumexp(logits, axis=-1), ((0, 0), (scored.shape[1] - tail, 0)))
    return jnp.where(scored, log_probs, 0.0)


def reply_nll(
    model: LoadedModel,
    encoded: EncodedQueries,
    replies: Sequence[Sequence[int]],
    batching: Batching = Batching(16),
) -> np.ndarray:
    """[n, 2] mean negative log-likelihood per token (nats) of reply i after encoded query i: column 0 over the
    whole reply, column 1 over its first `OPENING_TOKENS` tokens; NaN for an empty reply."""
    if len(replies) != len(encoded):
        raise DroJaxError(f"{encoded.source}: {len(replies)} replies for {len(encoded)} queries")
    if not replies:
        return np.zeros((0, 2))
    joined = EncodedQueries(
        [list(ids) + list(reply) for ids, reply in zip(encoded.sequences, replies)], encoded.soft_prompt, encoded.soft_starts,
        encoded.queries, f"{encoded.source} with their replies", encoded.prefix_length,
    )
    lengths = np.array([len(reply) for reply in replies])
    # The replies right-aligned in `longest` columns for every batch, bucketed like the rows' lengths, so that passes
    # whose longest replies differ a little (each setting's own replies) share a compiled program.
    longest = bucket_length(int(lengths.max()))

    def step(params, inputs: ModelInputs, batch: PaddedBatch) -> jax.Array:
        """[b, longest] the batch's token log-likelihoods, left on the device so that the next batch is dispatched
        before these are fetched (see `run_batched`)."""
        counts = lengths[np.where(batch.index >= 0, batch.index, 0)]
        scored = np.arange(longest)[None, :] >= longest - counts[:, None]
        with on_mesh(batching.mesh):
            return token_log_likelihoods(params, model.config, inputs, shard_batch(scored, batching.mesh))

    log_probs = run_batched(model, joined, step, PassInfo("reply likelihood", "reply"), batching).astype(np.float64)
    opening = np.arange(longest)[None, :] < longest - lengths[:, None] + OPENING_TOKENS
    totals = -np.stack([log_probs.sum(axis=1), (log_probs * opening).sum(axis=1)], axis=1)  # summed in float64
    counted = np.stack([lengths, np.minimum(lengths, OPENING_TOKENS)], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counted > 0, totals / np.maximum(counted, 1), np.nan)
