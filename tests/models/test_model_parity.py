"""Every layer, the final norm and the logits against transformers on the same tiny random weights."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dro_jax.loading import load_model
from dro_jax.models import forward
from helpers import TINY_CONFIGS, torch_positions

FLOAT32_ATOL = 1e-4
jit_forward = jax.jit(forward, static_argnames=("config", "output_hidden_states", "output_logits", "remat"))


def _random_batch(seed=0, batch=3, seq=12, vocab=320, padding="left"):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
    mask = np.ones((batch, seq), np.int32)
    lengths = [seq, seq - 3, seq - 7]
    for row, length in enumerate(lengths[:batch]):
        if padding == "left":
            mask[row, : seq - length] = 0
        else:
            mask[row, length:] = 0
    return ids, mask


def _torch_outputs(model, ids, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask),
            position_ids=torch_positions(mask),
            output_hidden_states=True,
        )


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("padding", ["left", "right"])
def test_float32_matches_transformers_layer_by_layer(tiny_model_dir, name, padding):
    directory, torch_model = tiny_model_dir(name)
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _random_batch(padding=padding)
    ours = jit_forward(model.params, model.config, ids, mask, output_hidden_states=True, output_logits=True)
    theirs = _torch_outputs(torch_model, ids, mask)
    real = mask.astype(bool)
    layers = model.config.num_layers
    assert len(theirs.hidden_states) == layers + 1
    for i in range(layers):  # HF entry i is the input of layer i; the last one is after the final norm
        np.testing.assert_allclose(np.asarray(ours.hidden_states[i])[real], theirs.hidden_states[i].numpy()[real], atol=FLOAT32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.last_hidden_state)[real], theirs.hidden_states[-1].numpy()[real], atol=FLOAT32_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(ours.logits)[real], theirs.logits.numpy()[real], atol=FLOAT32_ATOL, rtol=0)


def test_sliding_window_changes_the_result(tiny_model_dir):
    """The mistral config's window (5) is shorter than the sequence, so the parity above covers it."""
    directory, _ = tiny_model_dir("mistral")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _random_batch(batch=1)
    windowed = jit_forward(model.params, model.config, ids, mask).last_hidden_state
    import dataclasses

    unwindowed_config = dataclasses.replace(model.config, sliding_window=None)
    full = jit_forward(model.params, unwindowed_config, ids, mask).last_hidden_state
    assert np.abs(np.asarray(windowed[0, -1]) - np.asarray(full[0, -1])).max() > 1e-3


def test_bfloat16_close_to_float32_transformers(tiny_model_dir):
    """bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation).

    Over two layers the errors add up to around 1e-2 of the activations' scale,
    so the bound is 3e-2 relative to the largest |value| of the float32
    reference, per tensor; the transformers bfloat16 model is held to the same
    bound, so neither implementation gets a looser test.
    """
    directory, torch_model = tiny_model_dir("llama")
    model = load_model(directory, dtype="bfloat16", with_tokenizer=False, progress=False)
    assert model.params["layers"]["mlp"]["up_proj"]["weight"].dtype == jnp.bfloat16
    ids, mask = _random_batch()
    ours = jit_forward(model.params, model.config, ids, mask, output_logits=True)
    reference = _torch_outputs(torch_model, ids, mask)
    theirs_bf16 = _torch_outputs(copy.deepcopy(torch_model).to(torch.bfloat16), ids, mask)  # the fixture is shared
    real = mask.astype(bool)
    for candidate_hidden, candidate_logits in [
        (np.asarray(ours.last_hidden_state, np.float32), np.asarray(ours.logits)),
        (theirs_bf16.hidden_states[-1].float().numpy(), theirs_bf16.logits.float().numpy()),
    ]:
        for got, want in [(candidate_hidden, reference.hidden_states[-1].numpy()), (candidate_logits, reference.logits.numpy())]:
            scale = np.abs(want[real]).max()
            assert np.abs(got[real] - want[real]).max() <= 3e-2 * scale


def test_left_padded_batch_equals_each_sequence_alone(tiny_model_dir):
    directory, _ = tiny_model_dir("qwen2")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _random_batch(padding="left")
    batched = np.asarray(jit_forward(model.params, model.config, ids, mask).last_hidden_state[:, -1])
    for row in range(ids.shape[0]):
        alone = ids[row : row + 1, mask[row].astype(bool)]
        single = np.asarray(jit_forward(model.params, model.config, alone, np.ones_like(alone)).last_hidden_state[0, -1])
        np.testing.assert_allclose(batched[row], single, atol=1e-5, rtol=0)


def test_inputs_embeds_equal_token_ids(tiny_model_dir):
    from dro_jax.models import embed_tokens

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _random_batch()
    by_ids = jit_forward(model.params, model.config, ids, mask, output_logits=True)
    by_embeds = jit_forward(model.params, model.config, inputs_embeds=embed_tokens(model.params, ids), attention_mask=mask, output_logits=True)
    np.testing.assert_array_equal(np.asarray(by_ids.logits), np.asarray(by_embeds.logits))


def test_remat_gives_the_same_gradient(tiny_model_dir):
    from dro_jax.models import embed_tokens

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, with_tokenizer=False, progress=False)
    ids, mask = _random_batch()
    embeds = embed_tokens(model.params, ids)

    def loss(x, remat):
        out = forward(model.params, model.config, inputs_embeds=x, attention_mask=mask, remat=remat)
        return jnp.sum(out.last_hidden_state[:, -1] ** 2)

    plain = jax.jit(jax.grad(lambda x: loss(x, False))).trace(embeds)
    remat = jax.jit(jax.grad(lambda x: loss(x, True))).trace(embeds)
    # The remat model's gradient recomputes the layer (a checkpoint primitive, printed "remat2" by older JAX, in
    # its program); the plain one's does not.
    def checkpoints(traced):
        text = str(traced.jaxpr)
        return "checkpoint" in text or "remat" in text

    assert checkpoints(remat) and not checkpoints(plain)
    plain, remat = (traced.lower().compile()(embeds) for traced in (plain, remat))
    # Recomputation fuses differently, so float32 rounding differs slightly (gradients are O(1)).
    np.testing.assert_allclose(np.asarray(plain), np.asarray(remat), atol=1e-4, rtol=1e-4)
