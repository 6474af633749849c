"""Gradient accumulation: a batch of 50 run 10 rows at a time gives the loss and gradient of the whole batch,
for every refusal score and the prompt-tuning baseline; microbatch sizes that cannot split the batch are refused."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.dro.loss import REFUSAL_SCORES, dro_loss
from dro_jax.dro.microbatch import check_microbatch, map_microbatches
from dro_jax.dro.train import TrainConfig, TrainingFiles, frozen_inputs, train_soft_prompt
from helpers import QUIET

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

ROWS = 50


def _batch(data):
    """50 rows drawn from the training set, some weighted 0 like the filler rows of a padded batch."""
    index = np.arange(ROWS) % len(data)
    weights = np.ones(ROWS, np.float32)
    weights[-3:] = 0
    return jax.tree.map(jnp.asarray, data.rows(index, weights))


def _value_and_grad(loss, soft_prompt, batch, frozen):
    (total, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(soft_prompt, batch, frozen)
    return float(total), jax.tree.map(float, metrics), np.asarray(grad)


# Summing the same ROWS float32 values in another order (XLA tiles a batch of 10 and one of 50 differently) moves
# the sum by up to about ROWS * eps of the summands' scale; every comparison below allows that, against the
# largest value of its kind (a loss term's error is measured on the scale of the terms it is summed with, so a
# small term, such as a KL near zero computed from log-probabilities of order one, is not held to its own scale).
TOLERANCE = ROWS * float(np.finfo(np.float32).eps)  # about 6e-6


def _assert_same(accumulated, whole):
    assert accumulated[0] == pytest.approx(whole[0], rel=TOLERANCE)
    scale = max(abs(v) for v in whole[1].values())
    assert accumulated[1] == pytest.approx(whole[1], rel=0, abs=TOLERANCE * scale)
    np.testing.assert_allclose(accumulated[2], whole[2], rtol=0, atol=TOLERANCE * np.abs(whole[2]).max())
    assert np.abs(whole[2]).max() > 0


@pytest.mark.parametrize("score", sorted(REFUSAL_SCORES))
def test_microbatches_give_the_whole_batch_loss_and_gradient(tiny_dro, score):
    from helpers import TINY_OPENINGS
    from dro_jax.inference.refusal_score import Openings

    model = tiny_dro.model
    openings = TINY_OPENINGS if score == "openings" else Openings()
    frozen = frozen_inputs(model, tiny_dro.anchors, tiny_dro.data.prefix, openings)
    soft = jnp.asarray(tiny_dro.initial) + 0.05 * jax.random.normal(jax.random.key(0), tiny_dro.initial.shape)
    loss = functools.partial(dro_loss, config=model.config, refusal_score=score)
    whole = _value_and_grad(loss, soft, _batch(tiny_dro.data), frozen)
    accumulated = _value_and_grad(functools.partial(loss, microbatch=10), soft, _batch(tiny_dro.data), frozen)
    _assert_same(accumulated, whole)


@pytest.mark.parametrize("token_mean, unlikelihood_weight", [(False, 1.0), (True, 5.0)])
def test_prompt_tuning_microbatches_give_the_whole_batch(tiny_dro, token_mean, unlikelihood_weight):
    from dro_jax.dro.prompt_tuning import PromptTuningConfig, prepare_response_set, prompt_tuning_loss

    model = tiny_dro.model
    settings = PromptTuningConfig(responses=1, max_response_tokens=6, negatives=True)
    responses = prepare_response_set(model, tiny_dro.pairs, "short", len(tiny_dro.initial), settings, batching=QUIET)
    assert 0 < responses.wanted.sum() < len(responses)  # both terms in the batch
    frozen = frozen_inputs(model, None, responses.prefix)
    soft = jnp.asarray(tiny_dro.initial) + 0.05
    loss = functools.partial(prompt_tuning_loss, config=model.config, token_mean=token_mean, unlikelihood_weight=unlikelihood_weight)
    _assert_same(_value_and_grad(functools.partial(loss, microbatch=10), soft, _batch(responses), frozen),
                 _value_and_grad(loss, soft, _batch(responses), frozen))


def test_microbatches_keep_row_order():
    rows = (jnp.arange(12.0), jnp.arange(24.0).reshape(12, 2))
    out = map_microbatches(lambda r: (r[0] * 2, r[1].sum(axis=1)), rows, 4)
    np.testing.assert_array_equal(out[0], np.arange(12.0) * 2)
    np.testing.assert_array_equal(out[1], np.arange(24.0).reshape(12, 2).sum(axis=1))


def test_training_with_microbatches_takes_the_same_steps(tiny_dro, tmp_path, monkeypatch):
    """The same steps, and the microbatched run does split its batches: the sizes the loss asked
    `map_microbatches` for (it is looked up when the step is traced) are recorded per run."""
    import dro_jax.dro.loss

    sizes = []

    def recording(fn, rows, size):
        sizes.append((jax.tree.leaves(rows)[0].shape[0], size))
        return map_microbatches(fn, rows, size)

    monkeypatch.setattr(dro_jax.dro.loss, "map_microbatches", recording)
    model = tiny_dro.model
    config = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-2, checkpoint_every=100)
    whole = train_soft_prompt(model, tiny_dro.task, config, TrainingFiles(tmp_path / "whole"), progress=False)
    assert sizes and set(sizes) == {(6, None)}, sizes  # the whole batch in one pass
    sizes.clear()
    config = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-2, checkpoint_every=100, microbatch=2)
    accumulated = train_soft_prompt(model, tiny_dro.task, config, TrainingFiles(tmp_path / "micro"), progress=False)
    assert sizes and set(sizes) == {(6, 2)}, sizes  # the batch of 6 run 2 rows at a time
    np.testing.assert_allclose([m["loss"] for m in accumulated.metrics], [m["loss"] for m in whole.metrics], rtol=1e-6)
    # Four Adam steps carry the gradients' float32 reduction noise (1e-6) into the prompt, a few times larger.
    np.testing.assert_allclose(accumulated.soft_prompt, whole.soft_prompt, rtol=0, atol=1e-5 * np.abs(whole.soft_prompt).max())


def test_microbatch_sizes_that_cannot_split_the_batch_are_refused():
    check_microbatch(None, 50, 1)
    check_microbatch(10, 50, 2)
    check_microbatch(64, 50, 2)  # no smaller than the batch: one pass
    with pytest.raises(DroJaxError, match="must divide the batch of 50 rows"):
        check_microbatch(15, 50, 1)
    with pytest.raises(DroJaxError, match="multiple of the 4 ways"):
        check_microbatch(10, 40, 4)
    with pytest.raises(DroJaxError, match="microbatch must be at least 1"):
        TrainConfig(microbatch=0)
