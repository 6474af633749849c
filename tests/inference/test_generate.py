"""Generation: greedy parity with transformers `generate`, the KV cache, and the sampling distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.generate import candidates, generate_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.loading import load_model
from dro_jax.models.inputs import ModelInputs
from helpers import TINY_CONFIGS

STOP_ID, PAD_ID = 1, 0


def _left_padded_prompts(seed=0, batch=4, length=10, vocab=320):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for row, pad in enumerate([0, 3, 6, 1][:batch]):
        mask[row, :pad] = 0
    ids[mask == 0] = PAD_ID
    return ids, mask


def _hf_greedy(torch_model, ids, mask, max_new, stop_ids, pad_id):
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
            max_new_tokens=max_new, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id,
        )
    new = out[:, ids.shape[1]:].numpy()
    return np.pad(new, ((0, 0), (0, max_new - new.shape[1])), constant_values=pad_id)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_greedy_equals_transformers_generate(tiny_model_dir, name):
    directory, torch_model = tiny_model_dir(name)
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _left_padded_prompts()
    tokens, lengths = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], SamplingConfig(max_new_tokens=24), pad_id=PAD_ID)
    np.testing.assert_array_equal(tokens, _hf_greedy(torch_model, ids, mask, 24, [STOP_ID], PAD_ID))


def test_stop_token_ends_a_row_and_pads_the_rest(tiny_model_dir):
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _left_padded_prompts()
    free, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], SamplingConfig(max_new_tokens=12), pad_id=PAD_ID)
    stop = int(free[0, 4])  # make the fifth greedy token of row 0 a stop token
    tokens, lengths = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [stop], SamplingConfig(max_new_tokens=12), pad_id=PAD_ID)
    first_stop = np.argmax(free[0] == stop)
    assert lengths[0] == first_stop + 1
    assert (tokens[0, first_stop + 1:] == PAD_ID).all()
    np.testing.assert_array_equal(tokens, _hf_greedy(torch_model, ids, mask, 12, [stop], PAD_ID))
    held_back = SamplingConfig(max_new_tokens=12, min_new_tokens=8)
    held, held_lengths = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [stop], held_back, pad_id=PAD_ID)
    assert (held[:, :8] != stop).all() and (held_lengths >= 8).all()


def test_temperature_zero_is_greedy(tiny_model_dir):
    directory, _ = tiny_model_dir("qwen2")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _left_padded_prompts()
    greedy, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], SamplingConfig(max_new_tokens=8))
    zero_temperature = SamplingConfig(greedy=False, temperature=0.0, max_new_tokens=8)
    cold, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], zero_temperature)
    np.testing.assert_array_equal(greedy, cold)


def test_sampling_is_reproducible_per_row_key(tiny_model_dir):
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _left_padded_prompts()
    sampling = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8)
    keys = jax.random.split(jax.random.key(7), 4)
    first, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], sampling, keys)
    again, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], sampling, keys)
    np.testing.assert_array_equal(first, again)
    # Row 2 alone (same key) samples the same tokens as inside the batch.
    alone, _ = generate_tokens(model.params, model.config, ModelInputs(ids[2:3, 6:], mask[2:3, 6:]), [STOP_ID], sampling, keys[2:3])
    np.testing.assert_array_equal(alone[0], first[2])
    other, _ = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [STOP_ID], sampling, jax.random.split(jax.random.key(8), 4))
    assert (other != first).any()


def test_filtered_sampling_matches_its_distribution():
    """Empirical frequencies over many keys against softmax(logits / T) after top-k and top-p.

    With 40,000 draws, each frequency has a standard error of at most 0.0025,
    so 0.012 (about 5 standard errors) bounds the difference for every token.
    """
    logits = jnp.array([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, 0.8]])
    temperature, top_k, top_p = 0.7, 5, 0.8
    scaled = np.asarray(logits[0]) / temperature
    order = np.argsort(-scaled)

    def expected_kept(k, p):
        """The k highest tokens (all without top-k), then the head of their softmax whose mass before each is below p."""
        head = order[: k or 8]
        probs = np.exp(scaled[head] - scaled[head].max())
        probs /= probs.sum()
        return head[np.cumsum(probs) - probs < p]

    kept = expected_kept(top_k, top_p)
    expected = np.zeros(8)
    expected[kept] = np.exp(scaled[kept] - scaled[kept].max())
    expected /= expected.sum()

    scores, ids = candidates(logits, temperature, top_k, top_p)
    assert scores.shape == (1, top_k)  # only the top-k survivors are sorted and drawn from
    keys = jax.random.split(jax.random.key(0), 40_000)
    draws = np.asarray(ids[0])[np.asarray(jax.vmap(lambda k: jax.random.categorical(k, scores[0]))(keys))]
    observed = np.bincount(draws, minlength=8) / len(keys)
    assert set(np.flatnonzero(observed)) == set(kept)
    np.testing.assert_allclose(observed, expected, atol=0.012)
    assert len(expected_kept(0, 0.8)) < 8  # so top-p alone has tokens to drop
    for k, p in ((0, 0.8), (0, 1.0), (3, 1.0)):  # top-p alone sorts everything; no filter keeps everything
        scores, ids = candidates(logits, temperature, k, p)
        assert scores.shape == (1, k or 8)
        kept_ids = set(np.asarray(ids[0])[np.isfinite(np.asarray(scores[0]))])
        assert kept_ids == set(expected_kept(k, p)), (k, p)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max-new-tokens must be at least 1"),
        (dict(top_p=0.0), r"top-p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top-p must be in \(0, 1\]"),
        (dict(top_k=-1), "top-k"),
        (dict(temperature=-1.0), "temperature"),
        (dict(max_new_tokens=4, min_new_tokens=5), "min-new-tokens"),
    ],
)
def test_bad_sampling_settings(kwargs, message):
    with pytest.raises(DroJaxError, match=message):
        SamplingConfig(**kwargs)


def test_no_stop_ids_makes_every_token(tiny_model_dir):
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _left_padded_prompts()
    tokens, lengths = generate_tokens(model.params, model.config, ModelInputs(ids, mask), [], SamplingConfig(max_new_tokens=10), pad_id=PAD_ID)
    assert (lengths == 10).all()
    np.testing.assert_array_equal(tokens, _hf_greedy(torch_model, ids, mask, 10, [], PAD_ID))
