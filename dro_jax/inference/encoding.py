"""A query set tokenized once under one prompt setting, and reused by every pass over it.

Representations, refusal log-odds and generation all start from the same
chat-formatted token sequences; encoding them once per (query set, setting)
keeps the passes consistent and the tokenizer out of the loops.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.batching import PaddedBatch, left_padded_batches
from dro_jax.inference.chat import SLOT_PLACEHOLDER, ChatFormatter, PromptSetting, as_prompt_setting
from dro_jax.loading import LoadedModel
from dro_jax.parallel.sharding import replicate, shard_batch


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedQueries:
    """Chat-formatted token sequences; with a soft prompt, its rows start at `soft_starts[i]` in sequence i.

    `queries` are the texts the sequences came from (None for sequences given
    as token ids only); `source` names the set in error messages.
    """

    sequences: list[list[int]]
    soft_prompt: np.ndarray | None = None
    soft_starts: list[int] | None = None
    queries: list[str] | None = None
    source: str = "queries"

    @classmethod
    def of(cls, prompts: "EncodedQueries | Sequence[Sequence[int]]") -> "EncodedQueries":
        return prompts if isinstance(prompts, EncodedQueries) else cls([list(p) for p in prompts])

    def __len__(self) -> int:
        return len(self.sequences)

    def select(self, rows: Sequence[int]) -> "EncodedQueries":
        """The sequences at `rows` (repeats allowed), same soft prompt."""
        def pick(items):
            return None if items is None else [items[r] for r in rows]

        return EncodedQueries(pick(self.sequences), self.soft_prompt, pick(self.soft_starts), pick(self.queries), self.source)

    def batches(self, batch_size: int, pad_id: int, max_length: int | None = None) -> Iterator[PaddedBatch]:
        return left_padded_batches(self.sequences, batch_size, pad_id, max_length, self.soft_starts)

    def soft_inputs(self, batch: PaddedBatch) -> tuple[jax.Array | None, jax.Array | None]:
        """(soft_prompt, offsets) arguments for the model functions; (None, None) without one."""
        if self.soft_prompt is None:
            return None, None
        return jnp.asarray(self.soft_prompt), jnp.asarray(batch.soft_offsets)

    def model_inputs(self, batch: PaddedBatch, mesh: Mesh | None = None) -> tuple:
        """(token_ids, attention_mask, soft_prompt, soft_offsets) for the model functions.

        With a mesh, the rows are split over its devices and the soft prompt is on every device.
        """
        soft_prompt, offsets = self.soft_inputs(batch)
        token_ids, mask, offsets = shard_batch((batch.token_ids, batch.attention_mask, offsets), mesh)
        return token_ids, mask, replicate(soft_prompt, mesh), offsets


def encode_queries(
    model: LoadedModel, queries: Sequence[str], setting: PromptSetting | str | None, source: str = "queries"
) -> EncodedQueries:
    """Chat-formats every query under a prompt setting; a query that does not fit the context is an error."""
    setting = as_prompt_setting(setting)
    queries = list(queries)
    if setting.soft_prompt is None:
        formatter = ChatFormatter(model.tokenizer, setting.text)
        encoded = EncodedQueries([formatter.encode(q) for q in queries], queries=queries, source=source)
    else:
        if setting.soft_prompt.shape[1] != model.config.hidden_size:
            raise DroJaxError(
                f"{setting.name}: the soft prompt is {setting.soft_prompt.shape[1]} wide but the model's hidden size "
                f"is {model.config.hidden_size}"
            )
        formatter = ChatFormatter(model.tokenizer, SLOT_PLACEHOLDER)
        pairs = [formatter.encode_setting(q, len(setting.soft_prompt), model.pad_id) for q in queries]
        encoded = EncodedQueries([ids for ids, _ in pairs], setting.soft_prompt, [start for _, start in pairs], queries, source)
    limit = model.config.max_position_embeddings
    for number, ids in enumerate(encoded.sequences, start=1):
        if len(ids) > limit:
            raise DroJaxError(
                f"{source}: query {number} is {len(ids)} tokens with its chat template, "
                f"longer than the model's context of {limit}"
            )
    return encoded
