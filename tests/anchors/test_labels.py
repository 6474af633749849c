"""Refusal labels with a judge model: each part of the paper's rule decides the label.

The models here (the `forced` fixture, see `helpers.save_forced_models`) are
built so that their outputs are known: the policy answers every prompt with
"x", newline, "x", newline, ... and each judge answers "unsafe" (or "safe").
"""

import json

import numpy as np
import pytest

from dro_jax.anchors.labels import compliance_rates, label_queries
from dro_jax.cli.main import main
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.judging.judges import ModelJudge, StringJudge
from dro_jax.judging.responses import Measuring, Response, judged_responses
from dro_jax.loading import load_model
from helpers import HARMFUL, QUIET

QUERIES = HARMFUL[:3]


def test_the_constructed_models_do_what_the_rule_needs(forced):
    policy = load_model(forced["policy"], progress=False)
    newline = policy.tokenizer.convert_tokens_to_ids("Ċ")
    assert ChatFormatter(policy.tokenizer, None).encode(QUERIES[0])[-1] == newline  # the prompt ends in a newline
    texts = [r.text for r in _replies(policy, 8)]
    assert texts == ["x\nx\nx\nx"] * len(QUERIES)
    unsafe, safe = (ModelJudge(load_model(forced[v], progress=False)) for v in ("unsafe", "safe"))
    assert unsafe._encode(QUERIES[0], texts[0])[-1] == newline
    assert np.all(unsafe.unsafe_log_odds(QUERIES, texts) > 20) and np.all(safe.unsafe_log_odds(QUERIES, texts) < -20)
    assert safe.refusals(QUERIES, texts) == [True] * 3 and unsafe.refusals(QUERIES, texts) == [False] * 3


def _replies(model, max_new_tokens):
    from dro_jax.judging.responses import generate_responses

    return generate_responses(model, encode_queries(model, QUERIES, "none"), SamplingConfig(max_new_tokens=max_new_tokens), batching=QUIET)


@pytest.mark.parametrize(
    "verdict, phrases, max_new_tokens, complied",
    [
        ("unsafe", (), 8, 1.0),  # no refusal phrase, unsafe, four lines: compliance
        ("safe", (), 8, 0.0),  # the judge model's verdict decides
        ("unsafe", ("x",), 8, 0.0),  # a string-judged refusal is never compliance
        ("unsafe", (), 2, 0.0),  # "x\n" is one line: too short to count
    ],
)
def test_each_part_of_the_paper_rule_decides_the_label(forced, verdict, phrases, max_new_tokens, complied):
    policy = load_model(forced["policy"], progress=False)
    judge, judge_model = StringJudge(phrases), ModelJudge(load_model(forced[verdict], progress=False))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    encoded = encode_queries(policy, QUERIES, "none")
    rates = compliance_rates(judged_responses(policy, encoded, sampling, Measuring(1, judge=judge), QUIET, judge_model=judge_model), 3)
    np.testing.assert_array_equal(rates, [complied] * 3)
    labels = label_queries(policy, QUERIES, ["none", "short"], sampling, Measuring(1, judge=judge), judge_model, batching=QUIET)
    assert [label.compliance_rate for label in labels] == [complied] * 6


def test_label_command_with_a_judge_model(forced, tmp_path):
    queries = tmp_path / "q.txt"
    queries.write_text("\n".join(QUERIES), encoding="utf-8")
    for verdict, complied in (("unsafe", 1.0), ("safe", 0.0)):
        out = tmp_path / f"{verdict}.jsonl"
        assert main(["label", "--model", str(forced["policy"]), "--queries", str(queries), "--settings", "none", "--num-samples", "2",
                     "--max-new-tokens", "8", "--judge-model", str(forced[verdict]), "--out", str(out)]) == 0
        labels = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert [label["compliance_rate"] for label in labels] == [complied] * 3


def test_the_sampled_anchor_label_decodes_each_kind_of_query_with_its_own_sampling(tiny_model_dir, monkeypatch):
    """Harmful rows, then harmless rows, each with its set's sampling and judge, every sample counted; the sample
    keys keep each row's index in the whole set."""
    from dro_jax.anchors import collect
    from dro_jax.data.queries import QueryPairs
    from dro_jax.inference.sampling import SetSampling
    from helpers import HARMLESS

    calls = []

    def recorded(model, encoded, sampling, measuring, batching, query_numbers, judge_model, longest):
        """Ten responses per query, of which max_new_tokens / 100 comply: the rate tells which sampling served the row."""
        calls.append((encoded.queries, sampling.max_new_tokens, measuring.num_samples, measuring.judge, list(query_numbers), longest))
        complying = sampling.max_new_tokens // 100
        return [Response(q, "", s, "", 1, refusal=s >= complying) for q in range(len(encoded)) for s in range(10)]

    monkeypatch.setattr(collect, "judged_responses", recorded)
    model = load_model(tiny_model_dir("llama")[0], progress=False)
    sampling = SetSampling(SamplingConfig(max_new_tokens=300), SamplingConfig(max_new_tokens=200))
    config = collect.AnchorConfig(settings=("none",), label="sampled", num_samples=25, keep_longest=20, sampling=sampling)
    judge = StringJudge.load("paper")
    data = collect.collect_anchor_data(model, QueryPairs(HARMFUL[:2], HARMLESS[:2]), config, judge=judge, batching=QUIET)
    assert calls == [(HARMFUL[:2], 300, 25, judge, [0, 1], 20), (HARMLESS[:2], 200, 25, judge, [2, 3], 20)]
    np.testing.assert_allclose(data.compliance, [0.3, 0.3, 0.2, 0.2])


def test_the_label_counts_only_the_longest_responses_when_asked(monkeypatch):
    """The reference's label: of 5 samples, the 4 longest by words are judged and the rate is over those 4."""
    from dro_jax.anchors import labels
    from dro_jax.judging import responses as respond

    texts = ["Sure, here are the steps one two three", "I'm sorry", "Sure, here you go now", "Sure thing then", "Sure, step one is this"]
    replies = [Response(0, "q", s, text, 1, text.startswith("I'm sorry")) for s, text in enumerate(texts)]
    monkeypatch.setattr(respond, "generate_responses", lambda *args, **kwargs: replies)
    monkeypatch.setattr(respond, "judge_harm", lambda responses, *args, **kwargs: responses)
    encoded = [None]  # one query; only its length is read
    kept = respond.judged_responses(None, encoded, SamplingConfig(), Measuring(5), QUIET, longest=4)
    assert labels.compliance_rates(kept, 1)[0] == 1.0  # the shortest, a refusal, dropped
    assert labels.compliance_rates(respond.judged_responses(None, encoded, SamplingConfig(), Measuring(5), QUIET), 1)[0] == 0.8
