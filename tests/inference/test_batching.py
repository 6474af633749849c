import numpy as np
import pytest

from dro_jax.inference.batching import bucket_length, left_padded_batches


def test_bucket_lengths_waste_little_and_stay_few():
    assert [bucket_length(n) for n in (1, 8, 9, 100, 129, 257, 300, 1000)] == [8, 8, 16, 104, 136, 272, 304, 1024]
    for n in range(1, 5000):
        assert n <= bucket_length(n) <= n + max(7, n // 16)
    assert len({bucket_length(n) for n in range(100, 200)}) <= 13


def test_batches_cover_every_sequence_once_left_padded():
    rng = np.random.default_rng(0)
    sequences = [list(rng.integers(1, 50, size=rng.integers(1, 40))) for _ in range(23)]
    seen = []
    for batch in left_padded_batches(sequences, batch_size=5, pad_id=0):
        assert batch.token_ids.shape[0] == 5 and batch.token_ids.shape[1] == bucket_length(batch.token_ids.shape[1])
        for row, source in enumerate(batch.index):
            if source < 0:
                continue
            seq = sequences[source]
            assert batch.attention_mask[row].sum() == len(seq)
            assert list(batch.token_ids[row, -len(seq):]) == seq
            assert batch.attention_mask[row, -1] == 1
            seen.append(source)
    assert sorted(seen) == list(range(23))


def test_batch_size_must_be_positive():
    with pytest.raises(ValueError):
        list(left_padded_batches([[1]], batch_size=0))
