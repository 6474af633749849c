"""The fused attention path (`jax.nn.dot_product_attention`) gives what the reference path gives: every layer's
states and the logits with left padding, greedy generation through the KV cache, a shared prefix with its
soft-prompt gradient, in float32 and bfloat16, for the llama, mistral (sliding window) and qwen2 families.

The reference path is held to transformers in test_model_parity.py and the inference tests, so agreeing with
it within float rounding is agreeing with transformers.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.generate import generate_tokens
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.loading import load_model
from dro_jax.models import KVCache, ModelConfig, compute_logits, forward
from dro_jax.models.config import ATTENTION_IMPLEMENTATIONS
from dro_jax.models.inputs import ModelInputs, SharedPrefix, final_states, padded_prefix, prefix_cache, row_positions
from dro_jax.models.transformer import ATTENTION_FUNCTIONS, PREFIX_CHUNK, KeyBlock, attend, attend_filled_prefix, attend_fused, prefix_widths

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

FAMILIES = ("llama", "mistral", "qwen2")  # mistral's window (5) is shorter than the inputs, so it masks keys
# Both paths compute scores, softmax and the value sums in float32 and differ only in the order of the sums:
# 1e-5 is about 100 float32 roundings of the O(1) states and logits.
FLOAT32_ATOL = 1e-5
jit_forward = jax.jit(forward, static_argnames=("config", "output_hidden_states", "output_logits"))


def _both(model):
    """(reference config, fused config) of a loaded model."""
    assert model.config.attention == "reference"  # the default
    return model.config, dataclasses.replace(model.config, attention="fused")


def _left_padded(seed=0, pads=(0, 4, 9), length=12, vocab=320):
    """Random ids [len(pads), length] and their mask, row i left-padded by pads[i]."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(len(pads), length)).astype(np.int32)
    mask = (np.arange(length)[None] >= np.asarray(pads)[:, None]).astype(np.int32)
    return ids, mask


def test_every_implementation_has_a_function_and_a_reason():
    assert set(ATTENTION_FUNCTIONS) == set(ATTENTION_IMPLEMENTATIONS) == {"reference", "fused"}


def test_an_unknown_implementation_is_refused(tiny_model_dir):
    config = ModelConfig("llama", 320, 64, 128, 2, 4, 2, 16)
    assert config.attention == "reference"
    with pytest.raises(DroJaxError, match=r"unknown attention implementation 'flash'; choose one of reference, fused"):
        dataclasses.replace(config, attention="flash")
    with pytest.raises(DroJaxError, match="unknown attention implementation 'flash'"):
        load_model(tiny_model_dir("llama")[0], attention="flash", with_tokenizer=False, progress=False)
    assert load_model(tiny_model_dir("llama")[0], attention="fused", with_tokenizer=False, progress=False).config.attention == "fused"


@pytest.mark.parametrize("name", FAMILIES)
def test_left_padded_states_and_logits_equal_the_reference(tiny_model_dir, name):
    model = load_model(tiny_model_dir(name)[0], with_tokenizer=False, progress=False)
    ids, mask = _left_padded()
    reference, fused = (jit_forward(model.params, c, ids, mask, output_hidden_states=True, output_logits=True) for c in _both(model))
    real = mask.astype(bool)
    for want, got in [(reference.hidden_states, fused.hidden_states), (reference.last_hidden_state[None], fused.last_hidden_state[None])]:
        np.testing.assert_allclose(np.asarray(got)[:, real], np.asarray(want)[:, real], atol=FLOAT32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(fused.logits)[real], np.asarray(reference.logits)[real], atol=FLOAT32_ATOL, rtol=0)
    # Padding rows see no key in their first layer; their output is unused, but must stay finite.
    assert np.isfinite(np.asarray(fused.hidden_states)).all() and np.isfinite(np.asarray(fused.logits)).all()


def test_a_query_that_sees_no_key_attends_to_every_key():
    """Batch row 0 may see no key at all: the fused path lets it see all of them (finite values and gradients,
    whatever the kernel does with an empty softmax); batch row 1 is an ordinary causal one."""
    rng = np.random.default_rng(0)
    batch, kv_heads, group, steps, dim = 2, 2, 2, 4, 8
    query = jnp.asarray(rng.normal(size=(batch, kv_heads, group * steps, dim)), jnp.float32)
    key_t = jnp.asarray(rng.normal(size=(batch, kv_heads, dim, steps)), jnp.float32)
    value = jnp.asarray(rng.normal(size=(batch, kv_heads, steps, dim)), jnp.float32)
    allowed = jnp.stack([jnp.zeros((steps, steps), bool), jnp.tril(jnp.ones((steps, steps), bool))])

    out = attend_fused(query, [KeyBlock(key_t, value, allowed)])
    np.testing.assert_allclose(out[0], attend(query, [KeyBlock(key_t, value, jnp.ones_like(allowed))])[0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out[1], attend(query, [KeyBlock(key_t, value, allowed)])[1], atol=1e-6, rtol=0)
    grad = jax.grad(lambda q: attend_fused(q, [KeyBlock(key_t, value, allowed)]).sum())(query)
    assert np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("name", ATTENTION_IMPLEMENTATIONS)
@pytest.mark.parametrize(("slots", "filled"), [(128, 24), (128, 40), (128, 97), (384, 130)])
def test_a_prefix_is_read_only_up_to_the_first_width_that_holds_its_tokens(name, slots, filled):
    """A shared prefix padded past its tokens, read by one query per row: the slots past the first of
    `prefix_widths` that holds its tokens are NaN (masked, but 0 x NaN is NaN for a path that reads them), yet
    the result is that of the unpadded prefix (which it would not be if a width that cuts a token were read)."""
    rng = np.random.default_rng(1)
    batch, kv_heads, group, dim, own = 2, 2, 3, 8, 5
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    query, prefix_key_t, prefix_value = normal(batch, kv_heads, group, dim), normal(kv_heads, dim, slots), normal(kv_heads, slots, dim)
    cut = min(width for width in prefix_widths(slots) if width >= filled)
    prefix_key_t, prefix_value = prefix_key_t.at[..., cut:].set(jnp.nan), prefix_value.at[:, cut:].set(jnp.nan)
    own_block = KeyBlock(normal(batch, kv_heads, dim, own), normal(batch, kv_heads, own, dim), jnp.ones((batch, 1, own), bool))
    allowed = jnp.broadcast_to(jnp.arange(slots) < filled, (batch, 1, slots))
    attention = ATTENTION_FUNCTIONS[name]

    out = attend_filled_prefix(attention, query, [KeyBlock(prefix_key_t, prefix_value, allowed), own_block], jnp.int32(filled))
    unpadded = KeyBlock(prefix_key_t[..., :filled], prefix_value[:, :filled], None)
    np.testing.assert_allclose(out, attention(query, [unpadded, own_block]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ("llama", "mistral"))
def test_the_rows_after_a_padded_prefix_read_only_the_width_that_holds_it(tiny_model_dir, name):
    """`forward` of the rows' own tokens (3 rows of 4, left-padded) after a prefix of 40 tokens padded to 128
    slots, whose slots from 64 on are poisoned with NaN: the states equal those after the unpadded prefix
    (mistral's window of 5 lets the rows' first tokens see the prefix's last ones). Fails when a pass reads the
    prefix's padding past the first width that holds it."""
    model = load_model(tiny_model_dir(name)[0], with_tokenizer=False, progress=False)
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 320, size=PREFIX_CHUNK + 8).astype(np.int32)
    padded = prefix_cache(model.params, model.config, padded_prefix(tokens, -1))
    assert padded.key.shape[-1] == 128
    poisoned = padded.replace(key=padded.key.at[..., 64:].set(jnp.nan), value=padded.value.at[..., 64:, :].set(jnp.nan))
    unpadded = prefix_cache(model.params, model.config, SharedPrefix(jnp.asarray(tokens), jnp.int32(-1)))
    ids, mask = (jnp.asarray(a) for a in _left_padded(seed=5, pads=(0, 1, 3), length=4))

    def states(prefix):
        positions = row_positions(mask, prefix)
        return jit_forward(model.params, model.config, ids, mask, positions=positions, prefix=prefix).last_hidden_state

    np.testing.assert_allclose(np.asarray(states(poisoned)), np.asarray(states(unpadded)), atol=FLOAT32_ATOL, rtol=0)


def _prefill_and_decode(params, config, ids, mask, tokens):
    """Logits [b, 1 + n, vocab] of the last prompt position and of feeding tokens [b, n] one at a time through
    the KV cache (as generation does)."""
    batch, length = ids.shape
    steps = tokens.shape[1]
    key_mask = jnp.concatenate([mask, jnp.ones((batch, steps), mask.dtype)], axis=1)
    lengths = mask.sum(axis=1)
    cache = KVCache.zeros(config, batch, length + steps, params["embed_tokens"]["weight"].dtype)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = forward(params, config, ids, key_mask, positions=positions, cache=cache, cache_index=0)
    logits = [compute_logits(params, config, out.last_hidden_state[:, -1:])]
    for step in range(steps):
        out = forward(
            params, config, tokens[:, step : step + 1], key_mask, positions=(lengths + step)[:, None], cache=out.cache, cache_index=length + step
        )
        logits.append(compute_logits(params, config, out.last_hidden_state))
    return jnp.concatenate(logits, axis=1)


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decoding_equals_the_reference(tiny_model_dir, name):
    model = load_model(tiny_model_dir(name)[0], with_tokenizer=False, progress=False)
    ids, mask = _left_padded(seed=1, pads=(0, 3, 6, 1), length=10)
    greedy = SamplingConfig(max_new_tokens=12)
    reference, fused = _both(model)
    want, _ = generate_tokens(model.params, reference, ModelInputs(ids, mask), [1], greedy)
    got, _ = generate_tokens(model.params, fused, ModelInputs(ids, mask), [1], greedy)
    np.testing.assert_array_equal(got, want)
    # The numbers behind those tokens: prefill, then 6 decode steps past mistral's 5-token window.
    decode = jax.jit(_prefill_and_decode, static_argnums=1)
    logits = [np.asarray(decode(model.params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(want[:, :6]))) for config in (reference, fused)]
    np.testing.assert_allclose(logits[1], logits[0], atol=FLOAT32_ATOL, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_shared_prefix_equals_the_reference(tiny_model_dir, name):
    """A 9-token prefix without a batch axis with a 3-vector soft prompt inside it, then left-padded rows:
    final states, their gradient with respect to the soft prompt, and greedy tokens."""
    model = load_model(tiny_model_dir(name)[0], with_tokenizer=False, progress=False)
    rng = np.random.default_rng(2)
    prefix = SharedPrefix(jnp.asarray(rng.integers(3, 320, size=9), jnp.int32), jnp.int32(2))
    soft = jnp.asarray(0.02 * rng.normal(size=(3, model.config.hidden_size)), jnp.float32)
    ids, mask = _left_padded(seed=3, pads=(0, 3, 5), length=8)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)

    def loss(prompt, config):
        states = final_states(model.params, config, ModelInputs(ids, mask, prompt, jnp.full(ids.shape[0], -1), prefix))
        return jnp.sum(states**2), states

    results = [jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(soft, config) for config in _both(model)]
    ((_, want_states), want_grad), ((_, got_states), got_grad) = results
    np.testing.assert_allclose(np.asarray(got_states), np.asarray(want_states), atol=FLOAT32_ATOL, rtol=0)
    scale = np.abs(np.asarray(want_grad)).max()  # the soft prompt is within reach of every family's last positions
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), atol=1e-4 * scale, rtol=0)
    greedy = SamplingConfig(max_new_tokens=8)
    tokens = [generate_tokens(model.params, config, ModelInputs(ids, mask, soft, jnp.full(3, -1), prefix), [1], greedy)[0]
              for config in _both(model)]
    np.testing.assert_array_equal(tokens[1], tokens[0])


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_equals_the_reference_within_bfloat16_rounding(tiny_model_dir, name):
    """Both paths compute scores and softmax in float32 and round the probabilities to bfloat16 before the value
    sums. Over one key block (a forward pass) they do the same sums; over a KV cache and the new keys the
    reference rounds each block's share to bfloat16 before adding them, the fused path sums all keys at once.
    bfloat16 keeps 8 significant bits (2^-9 ~ 2e-3 relative per rounding): the two differ by about 5e-3 of the
    logits' scale, as much as either differs from float32, so the bound is 2e-2 of the largest |value| per
    tensor (test_model_parity.py holds the reference to 3e-2 against float32). A shared prefix too, whose
    scores the reference computes in float32 (XLA:CPU has no bfloat16 kernel for a key block without batch axis)."""
    model = load_model(tiny_model_dir(name)[0], dtype="bfloat16", with_tokenizer=False, progress=False)
    ids, mask = _left_padded()
    reference, fused = (jit_forward(model.params, c, ids, mask, output_logits=True) for c in _both(model))
    real = mask.astype(bool)
    pairs = [(reference.last_hidden_state[real], fused.last_hidden_state[real]), (reference.logits[real], fused.logits[real])]
    ids, mask = _left_padded(seed=1, pads=(0, 3, 6, 1), length=10)
    tokens = np.random.default_rng(4).integers(3, 320, size=(4, 6)).astype(np.int32)
    decode = jax.jit(_prefill_and_decode, static_argnums=1)
    pairs.append(tuple(decode(model.params, config, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(tokens)) for config in _both(model)))
    prefix = SharedPrefix(jnp.asarray(np.random.default_rng(5).integers(3, 320, size=9), jnp.int32), jnp.int32(-1))
    inputs = ModelInputs(jnp.asarray(ids), jnp.asarray(mask), prefix=prefix)
    pairs.append(tuple(jax.jit(final_states, static_argnums=1)(model.params, c, inputs) for c in _both(model)))
    for want, got in pairs:
        assert got.dtype == want.dtype
        want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
        assert np.abs(got - want).max() <= 2e-2 * np.abs(want).max()
