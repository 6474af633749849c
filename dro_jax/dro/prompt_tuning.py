"""The vanilla prompt-tuning baseline: sampled responses judged wanted or unwanted, and its loss.

Wanted responses are refusals of harmful queries and compliant answers to
harmless ones; the loss raises the likelihood of wanted and lowers that of
unwanted ones (unlikelihood). Responses are cut to `max_response_tokens`
(the reference uses 100).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dro_jax.anchors.collect import LABEL_SAMPLING
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.loss import Frozen, Objective, weighted_mean
from dro_jax.dro.microbatch import map_microbatches
from dro_jax.inference.chat import PromptSetting
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.judges import RefusalJudge
from dro_jax.inference.respond import generate_responses
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import SharedPrefix, input_embeddings, prefix_cache, row_positions
from dro_jax.models.transformer import compute_logits, forward


class ResponseBatch(NamedTuple):
    """Chat input + a sampled response, left-padded; `response_mask` marks the response tokens to score."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_offsets: jax.Array  # [b]
    response_mask: jax.Array  # [b, t]
    wanted: jax.Array  # [b] 1: raise its likelihood, 0: push it down (unlikelihood)
    weights: jax.Array  # [b]


def prompt_tuning_loss(
    soft_prompt: jax.Array, batch: ResponseBatch, frozen: Frozen, config: ModelConfig, remat: bool = False,
    microbatch: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Vanilla prompt tuning: mean token NLL of wanted responses, -log(1 - p) of unwanted ones."""
    params = frozen.params

    def per_sequence_loss(rows):
        token_ids, attention_mask, soft_offsets, response_mask, wanted = rows
        shared = prefix_cache(params, config, frozen.prefix, soft_prompt, remat)
        embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
        positions = row_positions(attention_mask, frozen.prefix)
        hidden = forward(
            params, config, inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, prefix=shared, remat=remat
        ).last_hidden_state
        log_probs = jax.nn.log_softmax(compute_logits(params, config, hidden[:, :-1]).astype(jnp.float32), axis=-1)
        token_log_p = jnp.take_along_axis(log_probs, token_ids[:, 1:, None], axis=-1)[..., 0]  # [b, t-1]
        scored = response_mask[:, 1:].astype(jnp.float32)
        likelihood = -token_log_p
        # -log(1 - p) = -log(-expm1(log p)); p is clipped below 1 so a certain token gives a large finite loss.
        unlikelihood = -jnp.log(-jnp.expm1(jnp.minimum(token_log_p, -1e-6)))
        wanted = wanted.astype(jnp.float32)[:, None]
        per_token = wanted * likelihood + (1 - wanted) * unlikelihood
        return jnp.sum(per_token * scored, axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1.0)

    rows = (batch.token_ids, batch.attention_mask, batch.soft_offsets, batch.response_mask, batch.wanted)
    per_sequence = map_microbatches(per_sequence_loss, rows, microbatch)
    wanted = batch.wanted.astype(jnp.float32)[:, None]
    total = weighted_mean(per_sequence, batch.weights)
    metrics = {
        "loss": total,
        "likelihood": weighted_mean(per_sequence, batch.weights * wanted[:, 0]),
        "unlikelihood": weighted_mean(per_sequence, batch.weights * (1 - wanted[:, 0])),
    }
    return total, metrics


@dataclasses.dataclass(frozen=True, eq=False)
class ResponseSet:
    """Query + response sequences after the prefix they share, left-padded to one length, with the soft
    prompt's slot (in the prefix or in the rows)."""

    prefix: SharedPrefix | None
    token_ids: np.ndarray  # [n, t]
    attention_mask: np.ndarray
    soft_offsets: np.ndarray
    response_mask: np.ndarray  # [n, t] 1 on response tokens
    wanted: np.ndarray  # [n]

    def __len__(self) -> int:
        return len(self.wanted)

    def rows(self, index: np.ndarray, weights: np.ndarray) -> ResponseBatch:
        return ResponseBatch(
            self.token_ids[index], self.attention_mask[index], self.soft_offsets[index],
            self.response_mask[index], self.wanted[index], weights,
        )


def prepare_response_set(
    model: LoadedModel,
    pairs: QueryPairs,
    init_prompt: str,
    num_rows: int,
    num_samples: int = 2,
    max_response_tokens: int = 100,
    seed: int = 42,
    judge: RefusalJudge | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> ResponseSet:
    """Samples `num_samples` responses per query under `init_prompt` and lays them out behind a `num_rows` slot."""
    queries = pairs.queries
    sampling = dataclasses.replace(
        LABEL_SAMPLING, max_new_tokens=max_response_tokens, min_new_tokens=min(LABEL_SAMPLING.min_new_tokens, max_response_tokens)
    )
    encoded = encode_queries(model, queries, PromptSetting.from_text(init_prompt))
    responses = generate_responses(model, encoded, sampling, num_samples, seed, judge=judge, progress=progress, mesh=mesh)
    slot = encode_queries(model, queries, PromptSetting.soft("slot", np.zeros((num_rows, model.config.hidden_size), np.float32)))
    replies = [model.tokenizer.encode(r.text, add_special_tokens=False)[:max_response_tokens] for r in responses]
    inputs = dataclasses.replace(
        slot.select([r.query_index for r in responses]),
        sequences=[slot.sequences[r.query_index] + reply for r, reply in zip(responses, replies)],
    )
    token_ids, mask, offsets = inputs.padded_rows(model.pad_id)
    response_mask = np.zeros_like(mask)
    for row, reply in enumerate(replies):
        response_mask[row, mask.shape[1] - len(reply) :] = 1
    wanted = [int(r.refusal == (r.query_index < len(pairs.harmful))) for r in responses]
    return ResponseSet(inputs.prefix(), token_ids, mask, offsets, response_mask, np.asarray(wanted, np.int32))


def prompt_tuning_objective(config: ModelConfig, remat: bool = False, microbatch: int | None = None) -> Objective:
    """The baseline's loss with its model config and microbatch size bound."""
    loss = functools.partial(prompt_tuning_loss, config=config, remat=remat, microbatch=microbatch)
    return Objective("prompt tuning", loss, ("loss", "likelihood", "unlikelihood"))
