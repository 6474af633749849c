"""The DRO training data: every training query behind the soft prompt's slot, with its base representation
(under the prompt the soft prompt starts from) and, with no safety prompt, its reference representation,
refusal log-odds and (for the `replies` term) greedy reply.

REPLY_TOKENS: how long the replies the `replies` term keeps are; the first tokens are where a prompt's
damage to harmless answers shows first, and each one costs a token of the training pass."""

from __future__ import annotations

import dataclasses

import numpy as np

from dro_jax.anchors.collect import AnchorData
from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.errors import DroJaxError
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.loss import QueryBatch
from dro_jax.dro.task import TrainingTask
from dro_jax.dro.train import TrainConfig
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.padding import bucket_length
from dro_jax.inference.refusal_score import Openings, RefusalScores, score_refusal
from dro_jax.inference.represent import represent_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import NO_PROMPT, PromptSetting
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import SharedPrefix

REPLY_TOKENS = 32


@dataclasses.dataclass(frozen=True, eq=False)
class TrainingSet:
    """Every training query's own part padded to one length after the prefix they share, with the soft
    prompt's slot (in the prefix or in the rows) and the base representation."""

    queries: list[str]
    prefix: SharedPrefix | None  # the template head and the soft prompt's slot, when every query shares them
    token_ids: np.ndarray  # [n, t]
    attention_mask: np.ndarray  # [n, t]
    soft_offsets: np.ndarray  # [n]
    base_states: np.ndarray  # [n, h] under the human prompt the soft prompt starts from
    reference_states: np.ndarray  # [n, h] with no safety prompt: what the preservation term keeps the replies near
    reference_log_odds: np.ndarray  # [n] refusal log-odds with no safety prompt
    harmless: np.ndarray  # [n] 1 = harmless
    reply_ids: np.ndarray  # [n, r] greedy reply with no safety prompt (harmless rows; r = 0 when not prepared)
    reply_mask: np.ndarray  # [n, r]

    def __len__(self) -> int:
        return len(self.queries)

    def rows(self, index: np.ndarray, weights: np.ndarray) -> QueryBatch:
        return QueryBatch(
            self.token_ids[index], self.attention_mask[index], self.soft_offsets[index],
            self.base_states[index], self.reference_states[index], self.reference_log_odds[index], self.harmless[index], weights,
            self.reply_ids[index], self.reply_mask[index],
        )


def prepare_training_set(
    model: LoadedModel,
    pairs: QueryPairs,
    init_prompt: str,
    num_rows: int,
    openings: Openings = Openings(),
    reply_tokens: int = 0,
    anchor_data: AnchorData | None = None,
    batching: Batching = Batching(),
) -> TrainingSet:
    """Encodes the queries with a `num_rows`-row slot. Their states under `init_prompt` (base) and their states
    and refusal log-odds (with `openings`) with no prompt (reference) are taken from `anchor_data` where it holds
    rows of those settings (the anchor stage's, on the same queries), computed otherwise. With `reply_tokens`, the
    harmless queries' greedy replies with no prompt, at most that many tokens, are generated for the `replies` term."""
    queries = pairs.queries
    expected = (len(queries), model.config.hidden_size)
    base, plain = (anchor_data.rows_of(init_prompt), anchor_data.rows_of(NO_PROMPT)) if anchor_data is not None else ([], [])
    if len(base):
        base_states = anchor_data.states[base]
    else:
        base_states = represent_tokens(model, encode_queries(model, queries, PromptSetting.from_text(init_prompt)), batching)
    if len(plain):
        reference = RefusalScores(anchor_data.refusal_log_odds[plain], anchor_data.states[plain])
    else:
        reference = score_refusal(model, encode_queries(model, queries, NO_PROMPT), openings, batching)
    for name, states in (("base", base_states), ("reference", reference.states)):
        if states.shape != expected:
            raise DroJaxError(f"{name} states are {states.shape}, expected {expected}")
    placeholder = PromptSetting.soft("slot", np.zeros((num_rows, model.config.hidden_size), np.float32))
    encoded = encode_queries(model, queries, placeholder)
    room = model.config.max_position_embeddings - encoded.prefix_length
    token_ids, mask, offsets = encoded.padded_rows(model.pad_id, min(bucket_length(max(map(len, encoded.rows))), room))
    reply_ids, reply_mask = _no_prompt_replies(model, pairs, reply_tokens, batching)
    # One setting trains, so no other shares its programs: the prefix unpadded (padding would add attention work
    # to every step: 37% per step on SmolLM2 on CPU).
    return TrainingSet(
        queries, encoded.prefix(bucket=None), token_ids, mask, offsets, base_states, reference.states,
        np.asarray(reference.log_odds, np.float32), pairs.harmless_flags, reply_ids, reply_mask,
    )


def _no_prompt_replies(model: LoadedModel, pairs: QueryPairs, tokens: int, batching: Batching) -> tuple[np.ndarray, np.ndarray]:
    """([n, tokens] ids, [n, tokens] mask): the harmless queries' greedy replies with no safety prompt (stop token
    included), right-padded; the harmful rows empty."""
    ids, mask = np.zeros((len(pairs), tokens), np.int32), np.zeros((len(pairs), tokens), np.int32)
    if tokens:
        encoded = encode_queries(model, list(pairs.harmless), NO_PROMPT, "harmless training queries")
        replies = generate_responses(model, encoded, SamplingConfig(max_new_tokens=tokens), batching=batching)
        for reply in replies:
            row = len(pairs.harmful) + reply.query_index
            ids[row, : len(reply.token_ids)], mask[row, : len(reply.token_ids)] = reply.token_ids, 1
    return ids, mask


def dro_task(
    model: LoadedModel,
    pairs: QueryPairs,
    anchors: AnchorSpace,
    initial: np.ndarray,
    init_prompt: str,
    config: TrainConfig,
    anchor_data: AnchorData | None = None,
    batching: Batching = Batching(),
) -> TrainingTask:
    """DRO on `pairs` from `initial`, whose rows take the slot of the prompt setting `init_prompt` ("none" for a
    random start), with `anchors`' space in the loss; the replies term's greedy replies are generated only when
    `config` weighs it. `dro-jax run`, `dro-jax train` and the experiments train DRO through this one task."""
    anchors.check_hidden_size(model.config.hidden_size)
    reply_tokens = REPLY_TOKENS if config.loss_weights.replies else 0
    data = prepare_training_set(model, pairs, init_prompt, len(initial), config.openings, reply_tokens, anchor_data, batching)
    return TrainingTask(initial, data, anchors=anchors)
