"""Padding token sequences into few, fixed shapes so `jit` compiles rarely, and finding the part they share."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np


def bucket_length(length: int, minimum: int = 8) -> int:
    """Rounds up to a multiple of 8, or of 1/32 of the length's octave for long sequences.

    So padding wastes less than one sixteenth of a long sequence, while a corpus
    of similar queries needs only a handful of compiled shapes (each compiles
    in about a second).
    """
    step = max(minimum, 1 << max(0, (max(length, 1) - 1).bit_length() - 5))
    return max(minimum, -(-length // step) * step)


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int, soft_starts: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token ids, mask, soft offsets) [n, length], each sequence right-aligned; offsets are -1 without soft starts."""
    token_ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=np.int32)
    soft_offsets = np.full(len(sequences), -1, dtype=np.int32)
    for row, seq in enumerate(sequences):
        token_ids[row, length - len(seq) :] = seq
        mask[row, length - len(seq) :] = 1
        if soft_starts is not None:
            soft_offsets[row] = length - len(seq) + soft_starts[row]
    return token_ids, mask, soft_offsets


@dataclasses.dataclass(frozen=True)
class PaddedBatch:
    """Left-padded token ids [batch, length] with mask; `index` maps rows to input order (-1 = filler).

    `soft_offsets` [batch] is where each row's soft-prompt rows start (-1: none).
    """

    token_ids: np.ndarray
    attention_mask: np.ndarray
    index: np.ndarray
    soft_offsets: np.ndarray

    @property
    def num_real(self) -> int:
        return int((self.index >= 0).sum())


def left_padded_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int = 0,
    max_length: int | None = None,
    soft_starts: Sequence[int] | None = None,
) -> Iterator[PaddedBatch]:
    """Batches of similar length (longest first), each padded to a bucketed length.

    Every batch has exactly `batch_size` rows (filler rows repeat a real one and
    have index -1), so each bucket compiles once. `soft_starts[i]` is where
    sequence i's soft-prompt rows start before padding.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = bucket_length(max(len(sequences[i]) for i in rows))
        if max_length is not None:
            length = min(length, max_length)
        sources = rows + [rows[0]] * (batch_size - len(rows))
        token_ids, mask, soft_offsets = left_pad(
            [sequences[i] for i in sources], length, pad_id, None if soft_starts is None else [soft_starts[i] for i in sources]
        )
        index = np.array(rows + [-1] * (batch_size - len(rows)), dtype=np.int64)
        yield PaddedBatch(token_ids, mask, index, soft_offsets)


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every sequence has in common, leaving each at least one token of its own."""
    if not sequences:
        return 0
    first, shortest = sequences[0], min(len(seq) for seq in sequences)
    length = 0
    while length < shortest - 1 and all(seq[length] == first[length] for seq in sequences):
        length += 1
    return length
