"""Measuring a setting: the paper's counts, the longest-N rule, and each query set encoded once per setting."""

import jax
import numpy as np
import pytest

from dro_jax.common.compiles import count_compiles
from dro_jax.common.errors import DroJaxError
from dro_jax.evaluation.evaluate import EvalConfig, evaluate_settings
from dro_jax.evaluation.measure import count_refusals
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.responses import keep_longest, response_words
from dro_jax.judging.responses import Response
from helpers import HARMFUL, HARMLESS, QUIET, TINY_OPENINGS


def _response(query, sample, words, refusal=False):
    return Response(query, f"q{query}", sample, " ".join(["word"] * words), words, refusal)


def test_keep_longest_keeps_each_querys_longest_replies_in_order():
    responses = [_response(0, 0, 5), _response(0, 1, 9), _response(0, 2, 9), _response(1, 0, 1), _response(1, 1, 7), _response(1, 2, 3)]
    kept = keep_longest(responses, 2)
    assert [(r.query_index, r.sample) for r in kept] == [(0, 1), (0, 2), (1, 1), (1, 2)]  # ties: the earlier sample
    assert keep_longest(responses, None) == responses
    assert [(r.query_index, r.sample) for r in keep_longest(responses, 1)] == [(0, 1), (1, 1)]


def test_the_longest_are_counted_in_words_not_tokens():
    few_long_words = Response(0, "q", 0, "Extraordinarily incomprehensible", 40, False)
    many_short_words = Response(0, "q", 1, "a b c d e", 5, False)
    assert response_words(few_long_words) == 2 and response_words(many_short_words) == 5
    assert keep_longest([few_long_words, many_short_words], 1) == [many_short_words]


def test_counts_follow_the_paper():
    """A harmless query counts against a prompt if any reply refuses, a harmful one if any complies."""
    flags = [[True, True], [True, False], [False, False]]
    responses = [_response(q, s, 3, refusal) for q, row in enumerate(flags) for s, refusal in enumerate(row)]
    assert count_refusals(responses, 3) == (3, 2, 2)


def test_evaluation_encodes_each_set_once_per_setting(tiny_dro, monkeypatch):
    """Generation and scoring share one encoding of each set per setting (`none`'s is the reference's own); the rows'
    log-odds and compliance logits match a separate scoring pass of each set under each setting."""
    encoded = []
    original = ChatFormatter.encode

    def counted(self, query):
        encoded.append(query)
        return original(self, query)

    monkeypatch.setattr(ChatFormatter, "encode", counted)
    datasets = {"harmful": HARMFUL[:3], "harmless": HARMLESS[:3]}
    settings = [PromptSetting.from_text("none"), PromptSetting.from_text("short")]
    evaluation = evaluate_settings(
        tiny_dro.model, datasets, settings, EvalConfig(SamplingConfig(max_new_tokens=3), openings=TINY_OPENINGS), tiny_dro.anchors, batching=QUIET
    )
    assert len(encoded) == 2 * 2 * 3  # settings x sets x queries: generation and scoring share one encoding
    assert encoded == [q for queries in datasets.values() for _ in settings for q in queries]
    monkeypatch.undo()
    assert [(r.setting, r.dataset) for r in evaluation.rows] == [(s, d) for d in datasets for s in ("none", "short")]
    rows = {(r.setting, r.dataset): r for r in evaluation.rows}
    anchors = tiny_dro.anchors
    for name, queries in datasets.items():
        logits = {}
        for setting in settings:
            scores = score_refusal(tiny_dro.model, encode_queries(tiny_dro.model, queries, setting, name), TINY_OPENINGS, QUIET)
            logits[setting.name] = float(np.mean(anchors.refusal.logits(anchors.leading(scores.states))))
            row = rows[setting.name, name]
            assert row.mean_refusal_log_odds == pytest.approx(float(np.mean(scores.log_odds)), abs=1e-4)
            assert row.compliance_logit == pytest.approx(logits[setting.name], abs=1e-4)
        assert logits["short"] != pytest.approx(logits["none"], abs=1e-3)  # (so the shift below is not zero by chance)
        assert rows["short", name].compliance_shift == pytest.approx(logits["short"] - logits["none"], abs=1e-4)
        assert rows["none", name].compliance_shift == 0.0
    for outcome in evaluation.outcomes:
        assert outcome.coords.shape == (3, 4) and len(outcome.responses) == 3


def test_every_setting_runs_the_same_compiled_programs(tiny_dro):
    """Settings with system prompts of different lengths, and a soft prompt, share each pass's compiled program:
    their shared prefixes are padded to one length, and the settings without a soft prompt carry an unused one."""
    settings = [PromptSetting.from_text("none"), PromptSetting.from_text("short"), PromptSetting.soft("DRO", tiny_dro.initial)]
    lengths = {len(s.text or "") for s in settings}
    assert len(lengths) == 2  # (the soft prompt's rows stand in for the short prompt's tokens)
    jax.clear_caches()
    with count_compiles() as count:
        evaluate_settings(
            tiny_dro.model, {"harmful": HARMFUL[:3]}, settings, EvalConfig(SamplingConfig(max_new_tokens=3), openings=TINY_OPENINGS),
            batching=QUIET,
        )
    passes = ("jit(_generate)", "jit(continuation_log_probs)", "jit(token_log_likelihoods)")
    assert {name: count.by_function[name] for name in passes} == dict.fromkeys(passes, 1)  # three queries: one batch shape


def test_each_set_is_decoded_with_its_own_sampling(tiny_dro):
    datasets = {"harmful": HARMFUL[:2], "harmless": HARMLESS[:2]}
    sampling = {"harmful": SamplingConfig(max_new_tokens=3, min_new_tokens=3), "harmless": SamplingConfig(max_new_tokens=5, min_new_tokens=5)}
    evaluation = evaluate_settings(tiny_dro.model, datasets, [PromptSetting.from_text("short")], EvalConfig(sampling), batching=QUIET)
    assert {o.dataset: {r.num_tokens for r in o.responses} for o in evaluation.outcomes} == {"harmful": {3}, "harmless": {5}}
    assert {d: [len(ids) for ids in ref.token_ids] for d, ref in evaluation.references.items()} == {"harmful": [3, 3], "harmless": [5, 5]}
    with pytest.raises(DroJaxError, match="no decoding given for the query set 'other' \\(given: harmful, harmless\\)"):
        evaluate_settings(tiny_dro.model, {"other": HARMFUL[:1]}, [PromptSetting.from_text("none")], EvalConfig(sampling), batching=QUIET)


def test_keeping_more_replies_than_were_sampled_is_an_error(tiny_dro):
    with pytest.raises(DroJaxError, match="cannot keep the 3 longest of 2"):
        evaluate_settings(tiny_dro.model, {"h": HARMFUL[:1]}, [PromptSetting.from_text("none")], EvalConfig(num_samples=2, longest=3))
