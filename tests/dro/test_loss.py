"""The DRO loss (its terms named once, in `LossWeights`), against direct computations (the prompt-tuning loss: test_prompt_tuning.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.dro.loss import LossWeights, dro_loss, dro_objective
from dro_jax.dro.train import frozen_inputs
from dro_jax.inference.batched import Batching
from dro_jax.inference.refusal_score import Openings
from dro_jax.models.inputs import ModelInputs, final_states
from helpers import QUIET, TINY_OPENINGS


def _full_batch(data):
    return jax.tree.map(jnp.asarray, data.rows(np.arange(len(data)), np.ones(len(data), np.float32)))


def _teacher_forced(model, prompts, continuations):
    """Per row: the log-probabilities of the continuation's tokens after the prompt, and the largest log-probability
    at each of those positions; one left-padded forward pass over every prompt + continuation."""
    from dro_jax.models.transformer import forward

    sequences = [list(prompt) + list(more) for prompt, more in zip(prompts, continuations)]
    width = max(map(len, sequences))
    token_ids = np.array([[model.pad_id] * (width - len(seq)) + seq for seq in sequences], np.int32)
    mask = np.array([[0] * (width - len(seq)) + [1] * len(seq) for seq in sequences], np.int32)
    logits = forward(model.params, model.config, jnp.asarray(token_ids), jnp.asarray(mask), output_logits=True).logits
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    out = []
    for row, more in enumerate(continuations):
        before = log_probs[row, width - len(more) - 1 : width - 1]  # the positions that predict each continuation token
        out.append((before[np.arange(len(more)), list(more)], before.max(axis=1)))
    return out


def test_loss_weights_name_the_terms_once():
    weights = LossWeights()
    assert LossWeights.terms() == ("refusal", "harmfulness", "norm", "preserve", "replies")
    assert weights.as_tuple() == (1.0, 1e-2, 1e-3, 0.0, 0.0)  # the paper's, and no preservation terms
    assert LossWeights.from_sequence([2, 3, 4, 5, 6]) == LossWeights(2.0, 3.0, 4.0, 5.0, 6.0)
    values = {"refusal": 2.0, "harmfulness": 100.0, "norm": 1000.0, "preserve": 7.0, "replies": 9.0}
    assert weights.combine(values) == pytest.approx(2.0 + 1.0 + 1.0)
    assert weights.ablate("harm", "norm") == LossWeights(1.0, 0.0, 0.0, 0.0, 0.0)  # the short name of the command line
    with pytest.raises(ValueError, match="unknown loss terms"):
        weights.ablate("accuracy")
    with pytest.raises(DroJaxError, match="one loss weight per term"):
        LossWeights.from_sequence([1.0, 2.0])
    with pytest.raises(DroJaxError, match="non-negative"):
        LossWeights(1.0, -1.0, 0.0)


MULTI_TOKEN = Openings(refusal=("No way", "I can not"), compliant=("Sure thing", "Here is"))


def test_behavioural_refusal_scores_and_the_preservation_term(tiny_dro):
    """`head` reads the first reply token from the final state, `openings` the whole openings (equal to the
    evaluation's log-odds), `preserve` is the first-token KL from the no-prompt reference on harmless rows;
    each checked by hand."""
    from dro_jax.inference.encoding import EncodedQueries
    from dro_jax.inference.refusal_score import OpeningReadout, score_refusal
    from dro_jax.models.transformer import compute_logits

    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    soft = jnp.asarray(initial) + 0.05 * jax.random.normal(jax.random.key(1), initial.shape)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix, MULTI_TOKEN)
    harmless = np.asarray(data.harmless, bool)
    weights = LossWeights(1.0, 0.0, 0.0, 0.5)
    _, probe = dro_loss(soft, batch, frozen, model.config, weights)
    _, head = dro_loss(soft, batch, frozen, model.config, weights, refusal_score="head")
    _, openings = dro_loss(soft, batch, frozen, model.config, weights, refusal_score="openings")
    new = final_states(model.params, model.config, ModelInputs(batch.token_ids, batch.attention_mask, soft, batch.soft_offsets, frozen.prefix))

    def log_probs(states):
        return np.asarray(jax.nn.log_softmax(compute_logits(model.params, model.config, jnp.asarray(states)[:, None])[:, 0]), np.float64)

    new_lp, base_lp = log_probs(new), log_probs(data.reference_states)  # base: the no-prompt reference
    kl = np.sum(np.exp(base_lp) * (base_lp - new_lp), axis=1)
    for metrics in (probe, head, openings):
        np.testing.assert_allclose(metrics["preserve"], kl[harmless].mean(), rtol=1e-4)
        np.testing.assert_allclose(metrics["compliance_shift_harmful"], probe["compliance_shift_harmful"], rtol=1e-4)
    readout = OpeningReadout.of(model.tokenizer, MULTI_TOKEN, model.config.vocab_size)

    def first_token(lp):
        return np.logaddexp.reduce(lp[:, readout.refusal_first], axis=1) - np.logaddexp.reduce(lp[:, readout.compliant_first], axis=1)

    first = first_token(new_lp)
    # The whole openings' log-odds: the evaluation's scoring pass over the same inputs, soft prompt in place.
    whole = EncodedQueries(
        [list(data.prefix.tokens) + list(ids[mask > 0]) for ids, mask in zip(data.token_ids, data.attention_mask)],
        np.asarray(soft), [int(data.prefix.soft_offset)] * len(data), prefix_length=len(data.prefix.tokens),
    )
    scored = score_refusal(model, whole, MULTI_TOKEN, batching=Batching(4, progress=False)).log_odds
    for metrics, log_odds, reference in ((head, first, first_token(base_lp)), (openings, scored, data.reference_log_odds)):
        # Refuse harmful queries; lean no more towards refusal on harmless ones than with no safety prompt.
        bce = np.where(harmless, np.logaddexp(0, log_odds - reference), np.logaddexp(0, -log_odds))
        np.testing.assert_allclose(metrics["refusal"], bce.mean(), rtol=1e-4)
        np.testing.assert_allclose(metrics["refusal_log_odds_harmful"], log_odds[~harmless].mean(), rtol=1e-4, atol=1e-5)
    assert "refusal_log_odds_harmful" not in probe
    # Gradients reach the soft prompt through each score.
    for score in ("head", "openings"):
        grad = jax.grad(lambda p: dro_loss(p, batch, frozen, model.config, weights, refusal_score=score)[0])(soft)
        assert np.isfinite(np.asarray(grad)).all() and float(jnp.abs(grad).max()) > 0


def test_a_zero_preservation_weight_leaves_the_papers_loss_as_it_was(tiny_dro):
    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    soft = jnp.asarray(initial) + 0.05
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix)
    total, metrics = dro_loss(soft, batch, frozen, model.config)
    assert float(metrics["preserve"]) > 0
    weighted = metrics["refusal"] + 1e-2 * metrics["harmfulness"] + 1e-3 * metrics["norm"]
    assert float(total) == pytest.approx(float(weighted), rel=4 * float(np.finfo(np.float32).eps))  # 3 float32 roundings
    with pytest.raises(DroJaxError, match="refusal score must be one of probe, head, openings"):
        dro_objective(model.config, refusal_score="logits")


def test_loss_at_the_initial_prompt(tiny_dro):
    """The soft prompt starts as the prompt's own embeddings: nothing has moved yet."""
    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    total, metrics = dro_loss(jnp.asarray(initial), _full_batch(data), frozen_inputs(model, anchors, data.prefix), model.config)
    np.testing.assert_allclose(metrics["refusal"], np.log(2), atol=1e-5)
    np.testing.assert_allclose(metrics["harmfulness"], np.log(2), atol=1e-5)
    assert float(metrics["norm"]) < 1e-8
    np.testing.assert_allclose(total, np.log(2) * 1.01, atol=1e-5)


def test_norm_term_equals_the_full_basis_form_and_ablations_drop_terms(tiny_dro):
    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    soft = jnp.asarray(initial) + 0.05 * jax.random.normal(jax.random.key(0), initial.shape)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix)
    total, metrics = dro_loss(soft, batch, frozen, model.config)
    inputs = ModelInputs(batch.token_ids, batch.attention_mask, soft, batch.soft_offsets, frozen.prefix)
    new = np.asarray(final_states(model.params, model.config, inputs))
    rest = (new - data.base_states) @ anchors.basis[:, anchors.num_components :]
    np.testing.assert_allclose(metrics["norm"], np.mean(rest**2), rtol=1e-4)
    np.testing.assert_allclose(total, sum(w * metrics[t] for t, w in zip(LossWeights.terms(), LossWeights().as_tuple())), rtol=1e-6)
    ablated, _ = dro_loss(soft, batch, frozen, model.config, LossWeights().ablate("norm", "refusal"))
    np.testing.assert_allclose(ablated, 1e-2 * metrics["harmfulness"], rtol=1e-6)


def test_the_replies_term_is_the_no_prompt_replies_nll_on_harmless_rows(tiny_dro):
    """`replies`: each harmless row's greedy no-prompt reply, scored teacher-forced under the soft prompt, mean NLL
    per token, averaged over the harmless rows; checked against the evaluation's own reply likelihood of the same
    replies under the same soft prompt. Not computed (0) when its weight is 0; refused without prepared replies.
    The training set's reference (states, log-odds) and replies are checked first against the queries with no
    safety prompt: the reference the preservation terms keep and the replies the `replies` term scores."""
    from dro_jax.dro.training_set import prepare_training_set
    from dro_jax.inference.encoding import encode_queries
    from dro_jax.inference.likelihood import reply_nll
    from dro_jax.inference.refusal_score import encode_openings
    from dro_jax.inference.represent import represent_tokens
    from dro_jax.inference.settings import NO_PROMPT, PromptSetting

    model, anchors, initial = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial
    data = prepare_training_set(model, tiny_dro.pairs, "short", len(initial), batching=QUIET, openings=TINY_OPENINGS, reply_tokens=6)
    harmful = len(tiny_dro.pairs.harmful)
    assert not data.reply_mask[:harmful].any() and (data.reply_mask[harmful:].sum(axis=1) > 0).all()
    # The reference: every query's state with no prompt, and the log-odds of its reply opening with "No" rather
    # than "Sure" there; the replies: each harmless query's, with no prompt, every token the most likely one
    # after what precedes it (greedy). All teacher-forced in one pass.
    queries = tiny_dro.pairs.queries
    plain = encode_queries(model, queries, NO_PROMPT)
    states = represent_tokens(model, plain, QUIET)
    np.testing.assert_allclose(data.reference_states, states, rtol=0, atol=1e-5 * np.abs(states).max())
    refuse, comply = encode_openings(model.tokenizer, TINY_OPENINGS.refusal + TINY_OPENINGS.compliant)
    replies = [list(ids[mask > 0]) for ids, mask in zip(data.reply_ids[harmful:], data.reply_mask[harmful:])]
    scored = _teacher_forced(model, plain.sequences * 2 + plain.sequences[harmful:], [refuse] * len(queries) + [comply] * len(queries) + replies)
    log_odds = [chosen.sum() for chosen, _ in scored[: len(queries)]] - np.array([chosen.sum() for chosen, _ in scored[len(queries) : 2 * len(queries)]])
    np.testing.assert_allclose(data.reference_log_odds, log_odds, rtol=0, atol=1e-4)
    for row, (chosen, best) in enumerate(scored[2 * len(queries) :]):
        np.testing.assert_allclose(chosen, best, rtol=0, atol=1e-4, err_msg=f"harmless query {row}")
    soft = jnp.asarray(initial) + 0.05 * jax.random.normal(jax.random.key(2), initial.shape)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix)
    weights = LossWeights(1.0, 0.0, 0.0, 0.0, 0.7)
    total, metrics = dro_loss(soft, batch, frozen, model.config, weights)
    replies = [tuple(ids[mask > 0]) for ids, mask in zip(data.reply_ids[harmful:], data.reply_mask[harmful:])]
    setting = PromptSetting.soft("trained", np.asarray(soft))
    expected = reply_nll(model, encode_queries(model, list(tiny_dro.pairs.harmless), setting), replies, batching=QUIET)[:, 0]
    np.testing.assert_allclose(metrics["replies"], np.mean(expected), rtol=1e-5)
    np.testing.assert_allclose(total, metrics["refusal"] + 0.7 * metrics["replies"], rtol=1e-6)
    assert float(dro_loss(soft, batch, frozen, model.config, LossWeights())[1]["replies"]) == 0.0
    with pytest.raises(DroJaxError, match="replies term needs"):
        dro_loss(soft, _full_batch(tiny_dro.data), frozen, model.config, weights)


def test_dro_objective_binds_the_config_and_shows_every_term(tiny_dro):
    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    weights = LossWeights(0.5, 0.0, 2.0)
    objective = dro_objective(model.config, weights)
    assert objective.name == "DRO training" and objective.shown == ("loss", *LossWeights.terms())
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix)
    soft = jnp.asarray(initial) + 0.05
    np.testing.assert_allclose(objective.loss(soft, batch, frozen)[0], dro_loss(soft, batch, frozen, model.config, weights)[0], rtol=1e-6)
