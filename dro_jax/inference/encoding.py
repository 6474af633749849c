"""A query set tokenized once under one prompt setting, and reused by every pass over it.

Representations, refusal log-odds and generation all start from the same
chat-formatted token sequences; encoding them once per (query set, setting)
keeps the passes consistent and the tokenizer out of the loops. The tokens
that every query of the set starts with (template head and system prompt,
human or soft) are found once too: each batch runs them once, as a shared
prefix (see `dro_jax.models.inputs`), and only the queries' own parts per row.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dro_jax.common.errors import DroJaxError
from dro_jax.data.suffixes import append_suffix
from dro_jax.inference.chat import SLOT_PLACEHOLDER, ChatFormatter
from dro_jax.inference.padding import PaddedBatch, left_pad, left_padded_batches, shared_prefix_length
from dro_jax.inference.settings import PromptSetting, as_prompt_setting
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import PREFIX_BUCKET, ModelInputs, SharedPrefix, padded_prefix
from dro_jax.models.transformer import KVCache
from dro_jax.parallel.sharding import replicate, shard_batch


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedQueries:
    """Chat-formatted token sequences; with a soft prompt, its rows start at `soft_starts[i]` in sequence i.

    `queries` are the texts the sequences came from (None for sequences given
    as token ids only); `source` names the set in error messages.
    `prefix_length` tokens, the same in every sequence, run once per pass
    (default: all that the sequences share; 0 runs every sequence whole).
    """

    sequences: list[list[int]]
    soft_prompt: np.ndarray | None = None
    soft_starts: list[int] | None = None
    queries: list[str] | None = None
    source: str = "queries"
    prefix_length: int | None = None

    def __post_init__(self) -> None:
        length = shared_prefix_length(self.sequences) if self.prefix_length is None else self.prefix_length
        if self.soft_starts and self.soft_prompt is not None:
            count = len(self.soft_prompt)
            if any(start < length < start + count for start in self.soft_starts):
                length = min(self.soft_starts)  # a soft prompt is wholly in the prefix or wholly in the rows
        object.__setattr__(self, "prefix_length", length)

    @classmethod
    def of(cls, prompts: "EncodedQueries | Sequence[Sequence[int]]") -> "EncodedQueries":
        return prompts if isinstance(prompts, EncodedQueries) else cls([list(p) for p in prompts])

    def __len__(self) -> int:
        return len(self.sequences)

    def select(self, rows: Sequence[int]) -> "EncodedQueries":
        """The sequences at `rows` (repeats allowed), same soft prompt and prefix."""
        def pick(items):
            return None if items is None else [items[r] for r in rows]

        return EncodedQueries(
            pick(self.sequences), self.soft_prompt, pick(self.soft_starts), pick(self.queries), self.source, self.prefix_length
        )

    def with_unused_soft_prompt(self, like: np.ndarray) -> "EncodedQueries":
        """The same sequences carrying a soft prompt shaped like `like` that no row reads (zeros, placed nowhere):
        passes over them then compile to the programs of a soft-prompt setting of that shape, which they share."""
        if self.soft_prompt is not None:
            return self
        return dataclasses.replace(self, soft_prompt=np.zeros_like(like))

    @property
    def soft_in_prefix(self) -> bool:
        return self.soft_starts is not None and bool(self.soft_starts) and self.soft_starts[0] < self.prefix_length

    def prefix(self, bucket: int | None = PREFIX_BUCKET) -> SharedPrefix | None:
        """The shared tokens (numpy, padded to a multiple of `bucket` as `padded_prefix` says; None: not padded), or
        None when the sequences share none."""
        if not self.prefix_length:
            return None
        offset = self.soft_starts[0] if self.soft_in_prefix else -1
        return padded_prefix(np.asarray(self.sequences[0][: self.prefix_length], np.int32), offset, bucket)

    @property
    def rows(self) -> list[list[int]]:
        """Each sequence's own part, after the shared prefix."""
        return [seq[self.prefix_length :] for seq in self.sequences]

    @property
    def row_soft_starts(self) -> list[int] | None:
        """Where the soft prompt starts in each row's own part (None: no soft prompt there)."""
        if self.soft_starts is None or self.soft_in_prefix:
            return None
        return [start - self.prefix_length for start in self.soft_starts]

    def batches(self, batch_size: int, pad_id: int, max_length: int | None = None) -> Iterator[PaddedBatch]:
        """The rows' own parts, left-padded in few shapes; `max_length` counts the prefix too."""
        limit = None if max_length is None else max_length - self.prefix_length
        return left_padded_batches(self.rows, batch_size, pad_id, limit, self.row_soft_starts)

    def padded_rows(self, pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(token_ids, mask, soft offsets) of every row's own part, left-padded to one `length` (default: the longest)."""
        rows = self.rows
        return left_pad(rows, max(map(len, rows)) if length is None else length, pad_id, self.row_soft_starts)

    def model_inputs(self, batch: PaddedBatch, mesh: Mesh | None = None, prefilled: KVCache | None = None) -> ModelInputs:
        """The model functions' inputs for one batch: with a mesh, the rows are split over its devices and
        the soft prompt and the prefix are on every device. `prefilled`: the prefix's keys and values, computed
        once for every batch (see `dro_jax.inference.batched.run_prefix`), in place of its tokens."""
        # jax.device_put, not jnp.asarray: on host values the latter compiles a small program per new shape
        soft_prompt = None if self.soft_prompt is None else jax.device_put(self.soft_prompt)
        offsets = None if self.soft_prompt is None else jax.device_put(batch.soft_offsets)
        token_ids, mask, offsets = shard_batch((batch.token_ids, batch.attention_mask, offsets), mesh)
        prefix = self.placed_prefix(mesh) if prefilled is None else prefilled
        return ModelInputs(token_ids, mask, replicate(soft_prompt, mesh), offsets, prefix)

    def placed_prefix(self, mesh: Mesh | None = None) -> SharedPrefix | None:
        """The shared tokens (padded, see `prefix`) on every device of `mesh`, or None when there are none."""
        prefix = self.prefix()
        return None if prefix is None else replicate(jax.device_put(prefix), mesh)


def encode_queries(
    model: LoadedModel,
    queries: Sequence[str],
    setting: PromptSetting | str | None,
    source: str = "queries",
    suffixes: Sequence[str] | None = None,
) -> EncodedQueries:
    """Chat-formats every query under a prompt setting (each pass over them checks that they fit the context).

    With `suffixes` (one per query, see `dro_jax.data.suffixes`), the token ids
    carry query + suffix while `EncodedQueries.queries` keeps the original
    texts: generation and scoring read the attack, judges the question asked.
    """
    setting = as_prompt_setting(setting)
    queries = list(queries)
    if suffixes is not None and len(suffixes) != len(queries):
        raise DroJaxError(f"{source}: {len(suffixes)} suffixes for {len(queries)} queries")
    texts = queries if suffixes is None else [append_suffix(q, s) for q, s in zip(queries, suffixes)]
    if setting.soft_prompt is None:
        formatter = ChatFormatter(model.tokenizer, setting.text)
        encoded = EncodedQueries([formatter.encode(t) for t in texts], queries=queries, source=source)
    else:
        if setting.soft_prompt.shape[1] != model.config.hidden_size:
            raise DroJaxError(
                f"{setting.name}: the soft prompt is {setting.soft_prompt.shape[1]} wide but the model's hidden size "
                f"is {model.config.hidden_size}"
            )
        formatter = ChatFormatter(model.tokenizer, SLOT_PLACEHOLDER)
        pairs = [formatter.encode_setting(t, len(setting.soft_prompt), model.pad_id) for t in texts]
        encoded = EncodedQueries([ids for ids, _ in pairs], setting.soft_prompt, [start for _, start in pairs], queries, source)
    return encoded
