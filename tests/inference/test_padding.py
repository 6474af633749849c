import numpy as np
import pytest

from dro_jax.common.compiles import count_compiles
from dro_jax.inference.batched import Batching
from dro_jax.inference.padding import bucket_length, left_padded_batches


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
    """Zero and negative batch sizes are refused by the batcher itself (a negative one would otherwise give no batches)."""
    for batch_size in (0, -1):
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            list(left_padded_batches([[1]], batch_size=batch_size))


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
            represent_tokens(model, sequences, batching=Batching(4, progress=False))
        return count.by_function["jit(final_states)"]

    last_position_states.clear_cache()
    assert compiles([9, 16, 12, 10, 11, 13, 15]) == 1  # batches of 16 and 13 tokens (and a filler row), one bucket
    assert compiles([20, 22, 17, 18, 9, 10, 11, 12]) == 1  # the 24-token bucket is new, the 16-token one is not


def test_the_next_batch_is_dispatched_before_the_last_one_is_fetched(tiny_model_dir, monkeypatch):
    """run_batched keeps one batch in flight: batch k + 1's step starts before batch k's outputs are copied to the
    host (so an accelerator does not wait on the host between batches), and every result still lands in input order."""
    import dro_jax.inference.batched as batched
    from dro_jax.inference.encoding import EncodedQueries
    from dro_jax.loading import load_model

    model = load_model(tiny_model_dir("llama")[0], with_tokenizer=False, progress=False)
    events = []
    fetch = batched.tree_to_host
    monkeypatch.setattr(batched, "tree_to_host", lambda x: events.append(("fetch", int(np.asarray(x).min()))) or fetch(x))

    def step(params, inputs, batch):
        events.append(("step", int(batch.index[batch.index >= 0].min())))
        return np.where(batch.index >= 0, batch.index, 99)  # each row's input number

    sequences = [[5] * n for n in (3, 9, 4, 10, 2, 11, 6)]  # longest first: batches {5, 3}, {1, 6}, {2, 0}, {4}
    out = batched.run_batched(model, EncodedQueries.of(sequences), step, batched.PassInfo("test"), batched.Batching(2, None, False))
    assert out.tolist() == list(range(7))
    assert events == [("step", 3), ("step", 1), ("fetch", 3), ("step", 0), ("fetch", 1), ("step", 4), ("fetch", 0), ("fetch", 4)]
