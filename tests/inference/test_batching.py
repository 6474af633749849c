import numpy as np
import pytest

from dro_jax.common.compiles import count_compiles
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


def test_the_representation_pass_compiles_once_per_length_bucket(tiny_model_dir):
    """Batches of different lengths within one bucket, and a last batch with a filler row, reuse one executable;
    a batch in a longer bucket adds one."""
    from dro_jax.inference.represent import last_position_states, represent_tokens
    from dro_jax.loading import load_model

    model = load_model(tiny_model_dir("llama")[0], with_tokenizer=False, progress=False)
    rng = np.random.default_rng(0)

    def compiles(lengths: list[int]) -> int:
        sequences = [rng.integers(3, model.config.vocab_size, n).tolist() for n in lengths]
        with count_compiles() as count:
            represent_tokens(model, sequences, batch_size=4, progress=False)
        return count.by_function["jit(final_states)"]

    last_position_states.clear_cache()
    assert compiles([9, 16, 12, 10, 11, 13, 15]) == 1  # batches of 16 and 13 tokens (and a filler row), one bucket
    assert compiles([20, 22, 17, 18, 9, 10, 11, 12]) == 1  # the 24-token bucket is new, the 16-token one is not
