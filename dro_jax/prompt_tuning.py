"""Training data for the vanilla prompt-tuning baseline: sampled responses, judged, as wanted or unwanted.

Wanted responses are refusals of harmful queries and compliant answers to
harmless ones; the loss (`dro_loss.prompt_tuning_loss`) raises the
likelihood of wanted and lowers that of unwanted ones (unlikelihood).
Responses are cut to `max_response_tokens` (the reference uses 100).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.anchor_data import LABEL_SAMPLING
from dro_jax.batching import left_pad
from dro_jax.chat import PromptSetting
from dro_jax.dro_loss import ResponseBatch
from dro_jax.judges import StringJudge
from dro_jax.loading import LoadedModel
from dro_jax.represent import encode_queries
from dro_jax.respond import generate_responses
from dro_jax.queries import check_query_sets


@dataclasses.dataclass(frozen=True, eq=False)
class ResponseSet:
    """Query + response sequences, left-padded to one length, with the soft-prompt slot of each."""

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
    harmful: Sequence[str],
    harmless: Sequence[str],
    init_prompt: str,
    num_rows: int,
    num_samples: int = 2,
    max_response_tokens: int = 100,
    seed: int = 42,
    judge: StringJudge | None = None,
    progress: bool = True,
) -> ResponseSet:
    """Samples `num_samples` responses per query under `init_prompt` and lays them out behind a `num_rows` slot."""
    check_query_sets(harmful, harmless)
    queries = list(harmful) + list(harmless)
    sampling = dataclasses.replace(
        LABEL_SAMPLING, max_new_tokens=max_response_tokens, min_new_tokens=min(LABEL_SAMPLING.min_new_tokens, max_response_tokens)
    )
    responses = generate_responses(model, queries, PromptSetting.from_text(init_prompt), sampling, num_samples, seed, judge=judge, progress=progress)
    slot = encode_queries(model, queries, PromptSetting.soft("slot", np.zeros((num_rows, model.config.hidden_size), np.float32)))
    sequences, starts, response_lengths, wanted = [], [], [], []
    for response in responses:
        reply = model.tokenizer.encode(response.text, add_special_tokens=False)[:max_response_tokens]
        sequences.append(slot.sequences[response.query_index] + reply)
        starts.append(slot.soft_starts[response.query_index])
        response_lengths.append(len(reply))
        is_harmful = response.query_index < len(harmful)
        wanted.append(int(response.refusal == is_harmful))
    length = max(map(len, sequences))
    token_ids, mask, offsets = left_pad(sequences, length, model.pad_id, starts)
    response_mask = np.zeros_like(mask)
    for row, reply_length in enumerate(response_lengths):
        response_mask[row, length - reply_length :] = 1
    return ResponseSet(token_ids, mask, offsets, response_mask, np.asarray(wanted, np.int32))
