"""The prompt-tuning baseline: its two ways of averaging against a hand computation, the unlikelihood weight,
the no-prompt negatives, and the reference's preset."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.prompt_tuning import (
    PromptTuningConfig, prepare_response_set, prompt_tuning_loss, prompt_tuning_objective, reference_unlikelihood_weight,
)
from dro_jax.dro.train import frozen_inputs
from helpers import QUIET

QUICK = PromptTuningConfig(responses=2, max_response_tokens=6)


@pytest.fixture(scope="module")
def responses(tiny_dro):
    """Responses to 2 harmful and 2 harmless queries, rows cut to different lengths (1 to 6 scored tokens)."""
    pairs = QueryPairs(tiny_dro.pairs.harmful[:2], tiny_dro.pairs.harmless[:2])
    data = prepare_response_set(tiny_dro.model, pairs, "short", len(tiny_dro.initial), QUICK, batching=QUIET)
    # The tiny model never refuses: harmful queries' responses are unwanted, harmless ones' wanted.
    assert data.wanted.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    mask = data.response_mask.copy()
    for row in range(len(data)):
        scored = np.nonzero(mask[row])[0]
        mask[row, scored[1 + row % len(scored):]] = 0  # keep the first 1 + row % n response tokens
    data = dataclasses.replace(data, response_mask=mask)
    assert len(set(mask.sum(axis=1).tolist())) > 2
    return data


def _hand_token_losses(tiny_dro, data) -> list[np.ndarray]:
    """Each row's scored token losses from one plain forward pass over the whole inputs: -log p for wanted rows,
    -log(1 - p) for unwanted ones (the soft prompt equals the prompt's own embeddings here)."""
    from dro_jax.models import forward
    from dro_jax.models.inputs import input_embeddings
    from dro_jax.parity.torch_dro import whole_sequences

    model, initial = tiny_dro.model, tiny_dro.initial
    rows = data.rows(np.arange(len(data)), np.ones(len(data), np.float32))
    ids, mask, offsets = whole_sequences(rows, data.prefix)
    embeds = input_embeddings(model.params, jnp.asarray(ids), jnp.asarray(initial), jnp.asarray(offsets))
    logits = np.asarray(forward(model.params, model.config, inputs_embeds=embeds, attention_mask=jnp.asarray(mask), output_logits=True).logits)
    log_p = np.asarray(jax.nn.log_softmax(logits[:, :-1], axis=-1))
    start = ids.shape[1] - data.token_ids.shape[1]  # where the rows' own parts begin
    losses = []
    for row in range(len(data)):
        scored = start + np.nonzero(data.response_mask[row])[0] - 1  # positions that predict a response token
        token_log_p = np.array([log_p[row, i, ids[row, i + 1]] for i in scored], np.float64)
        losses.append(-token_log_p if data.wanted[row] else -np.log1p(-np.exp(token_log_p)))
    return losses


def _loss(tiny_dro, data, **options):
    batch = jax.tree.map(jnp.asarray, data.rows(np.arange(len(data)), np.ones(len(data), np.float32)))
    total, metrics = prompt_tuning_loss(
        jnp.asarray(tiny_dro.initial), batch, frozen_inputs(tiny_dro.model, None, data.prefix), tiny_dro.model.config, **options
    )
    return float(total), {k: float(v) for k, v in metrics.items()}


def test_the_two_means_against_a_hand_computation(tiny_dro, responses):
    losses = _hand_token_losses(tiny_dro, responses)
    wanted = responses.wanted.astype(bool)
    per_sequence, metrics = _loss(tiny_dro, responses)
    np.testing.assert_allclose(per_sequence, np.mean([row.mean() for row in losses]), rtol=1e-5)
    assert set(metrics) == {"loss", "likelihood", "unlikelihood"}
    token_mean, metrics = _loss(tiny_dro, responses, token_mean=True)
    by_hand = {kind: np.concatenate([row for row, w in zip(losses, wanted) if w == is_wanted]).mean()
               for kind, is_wanted in (("likelihood", True), ("unlikelihood", False))}
    np.testing.assert_allclose(token_mean, by_hand["likelihood"] + by_hand["unlikelihood"], rtol=1e-5)
    np.testing.assert_allclose([metrics["likelihood"], metrics["unlikelihood"]], [by_hand["likelihood"], by_hand["unlikelihood"]], rtol=1e-5)
    assert abs(token_mean - per_sequence) > 1e-3 * abs(per_sequence)  # rows of different lengths weigh differently


@pytest.mark.parametrize("token_mean", [False, True])
def test_the_unlikelihood_weight_scales_only_the_unwanted_rows(tiny_dro, responses, token_mean):
    losses = _hand_token_losses(tiny_dro, responses)
    base, plain = _loss(tiny_dro, responses, token_mean=token_mean)
    heavy, weighted = _loss(tiny_dro, responses, token_mean=token_mean, unlikelihood_weight=5.0)
    assert weighted["likelihood"] == pytest.approx(plain["likelihood"], rel=1e-6)
    assert weighted["unlikelihood"] == pytest.approx(plain["unlikelihood"], rel=1e-6)
    # The difference of two float32 losses keeps their absolute rounding error (each a mean over the 8 rows: up to
    # about 8 eps of the loss), which is far more than eps of the small difference itself.
    tolerance = len(responses) * float(np.finfo(np.float32).eps) * abs(heavy)
    if token_mean:
        assert heavy - base == pytest.approx(4.0 * plain["unlikelihood"], abs=tolerance)
    else:  # the unwanted rows' means count 5 times in the mean over all rows
        unwanted = sum(row.mean() for row, w in zip(losses, responses.wanted) if not w)
        assert heavy - base == pytest.approx(4.0 * unwanted / len(responses), abs=tolerance)
    wanted_only = dataclasses.replace(responses, wanted=np.ones_like(responses.wanted))
    assert _loss(tiny_dro, wanted_only, token_mean=token_mean, unlikelihood_weight=5.0)[0] == pytest.approx(
        _loss(tiny_dro, wanted_only, token_mean=token_mean)[0], rel=1e-6)


class _FixedJudge:
    """Calls every response a refusal (or none), and keeps each call's responses."""

    def __init__(self, refuses: bool):
        self.refuses, self.calls = refuses, []

    def refusals(self, queries, responses, progress=False):
        self.calls.append(list(zip(queries, responses)))
        return [self.refuses] * len(responses)


@pytest.mark.parametrize("refuses", [True, False])
def test_negatives_are_the_unwanted_no_prompt_responses(tiny_dro, refuses):
    """Always refusing, the negatives are every no-prompt response to a harmless query; never refusing, every
    one to a harmful query; all with wanted=0, after the init-prompt rows, which do not change."""
    model, pairs = tiny_dro.model, QueryPairs(tiny_dro.pairs.harmful[:2], tiny_dro.pairs.harmless[:2])
    judge = _FixedJudge(refuses)
    settings = dataclasses.replace(QUICK, negatives=True, judge=judge)
    data = prepare_response_set(model, pairs, "short", len(tiny_dro.initial), settings, batching=QUIET)
    plain = prepare_response_set(model, pairs, "short", len(tiny_dro.initial), dataclasses.replace(settings, negatives=False), batching=QUIET)
    init_rows, no_prompt = judge.calls[0], judge.calls[1]
    assert judge.calls[2] == init_rows  # the run without negatives sampled the same init-prompt responses
    unwanted = set(pairs.harmless if refuses else pairs.harmful)
    negatives = [(q, text) for q, text in no_prompt if q in unwanted]
    assert len(data) == len(init_rows) + len(negatives) == 8 + 4
    np.testing.assert_array_equal(data.wanted[:8], plain.wanted)
    assert data.wanted[8:].tolist() == [0] * 4
    for row, (_, text) in zip(range(8, 12), negatives):
        reply = model.tokenizer.encode(text, add_special_tokens=False)[:settings.max_response_tokens]
        assert data.token_ids[row, data.response_mask[row] == 1].tolist() == reply  # a no-prompt reply, trained under the slot
    assert [text for _, text in no_prompt] != [text for _, text in init_rows]


def test_the_longest_responses_are_kept(tiny_dro, monkeypatch):
    """Of each query's sampled replies, the `responses` longest by words are trained on, in sample order."""
    import dro_jax.dro.prompt_tuning as prompt_tuning
    from dro_jax.judging.responses import Response

    # By words samples 2 and 0 are the longest; by characters 3 and 1; by the token counts reported, 0 and 1.
    texts = ["a b c d", "extraordinarily", "x y z w v", "internationalization"]  # kept: samples 0 and 2
    num_tokens = [9, 8, 1, 2]

    def sampled(model, encoded, sampling, samples, seed, *_):
        assert samples == len(texts)
        return [Response(q, encoded.queries[q], s, text, num_tokens[s], False)
                for q in range(len(encoded.queries)) for s, text in enumerate(texts)]

    monkeypatch.setattr(prompt_tuning, "generate_responses", sampled)
    pairs = QueryPairs(tiny_dro.pairs.harmful[:1], tiny_dro.pairs.harmless[:1])
    settings = PromptTuningConfig(responses=2, samples=len(texts), max_response_tokens=50)
    data = prepare_response_set(tiny_dro.model, pairs, "short", len(tiny_dro.initial), settings, batching=QUIET)
    trained = [data.token_ids[row][data.response_mask[row] == 1].tolist() for row in range(len(data))]
    encode = lambda text: tiny_dro.model.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    assert trained == [encode(texts[0]), encode(texts[2])] * 2


def test_negatives_need_a_human_init_prompt(tiny_dro):
    with pytest.raises(DroJaxError, match="need a human init prompt"):
        prepare_response_set(tiny_dro.model, tiny_dro.pairs, "none", 3, dataclasses.replace(QUICK, negatives=True), batching=QUIET)


def test_the_reference_preset_and_the_quick_default():
    reference = PromptTuningConfig.reference("meta-llama/Llama-2-7b-chat-hf")
    assert (reference.responses, reference.samples, reference.negatives, reference.token_mean) == (20, 25, True, True)
    assert (reference.unlikelihood_weight, reference.max_response_tokens, reference.max_new_tokens, reference.epochs) == (5.0, 100, 300, 5)
    assert PromptTuningConfig.reference("lmsys/vicuna-7b-v1.5").unlikelihood_weight == 1.0
    assert PromptTuningConfig.reference("x", responses=3, samples=None).responses == 3
    quick = PromptTuningConfig()
    assert (quick.responses, quick.samples, quick.negatives, quick.token_mean, quick.unlikelihood_weight) == (2, None, False, False, 1.0)
    assert (quick.max_response_tokens, quick.generated_tokens, quick.epochs, quick.judge) == (100, 100, 5, None)


@pytest.mark.parametrize("model, weight", [
    ("/models/Llama-2-7b-chat-hf", 5.0), ("codellama/CodeLlama-7b-Instruct-hf", 5.0), ("meta-llama/Llama-2-7b-hf", 1.0),
    ("mistralai/Mistral-7B-Instruct-v0.1", 1.0), ("openchat/openchat-3.5-1210", 1.0), ("smollm2", 1.0),
])
def test_the_reference_unlikelihood_weight_by_model(model, weight):
    assert reference_unlikelihood_weight(model) == weight


@pytest.mark.parametrize("options, message", [
    (dict(responses=0), "responses must be at least 1"),
    (dict(responses=5, samples=4), "cannot keep 5 responses per query out of 4"),
    (dict(unlikelihood_weight=-1.0), "unlikelihood weight must be non-negative"),
    (dict(max_new_tokens=0), "max new tokens must be at least 1"),
])
def test_bad_settings_are_refused(options, message):
    with pytest.raises(DroJaxError, match=message):
        PromptTuningConfig(**options)


def test_the_objective_binds_the_settings(tiny_dro, responses):
    settings = PromptTuningConfig(token_mean=True, unlikelihood_weight=3.0)
    objective = prompt_tuning_objective(tiny_dro.model.config, settings)
    assert objective.shown == ("loss", "likelihood", "unlikelihood")
    batch = jax.tree.map(jnp.asarray, responses.rows(np.arange(len(responses)), np.ones(len(responses), np.float32)))
    total = objective.loss(jnp.asarray(tiny_dro.initial), batch, frozen_inputs(tiny_dro.model, None, responses.prefix))[0]
    assert float(total) == pytest.approx(_loss(tiny_dro, responses, token_mean=True, unlikelihood_weight=3.0)[0], rel=1e-6)
