"""Adversarial suffixes in `evaluate` and `sweep`: the model reads query + suffix, every judge the original query."""

import json

import numpy as np
import pytest

from dro_jax.cli.main import main
from dro_jax.data.suffixes import QuerySuffix
from dro_jax.evaluation.evaluate import EvalConfig, evaluate_settings
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.judges import StringJudge
from helpers import HARMFUL, HARMLESS, QUIET, TINY_OPENINGS

QUERIES = HARMFUL[:3]
SUFFIX = QuerySuffix("attack", ("about the sea and the wind",), per_query=False)


class RecordingJudge:
    """The string judge's verdicts, keeping every query it was shown."""

    def __init__(self):
        self.queries = []

    def refusals(self, queries, responses, progress=False):
        self.queries += list(queries)
        return StringJudge.default().refusals(queries, responses)


def test_the_tokens_carry_the_suffix_and_the_texts_stay_the_queries(tiny_dro):
    model = tiny_dro.model
    suffixes = SUFFIX.for_queries(len(QUERIES), "harmful")
    encoded = encode_queries(model, QUERIES, "short", "harmful", suffixes)
    formatter = ChatFormatter(model.tokenizer, PromptSetting.from_text("short").text)
    assert encoded.sequences == [formatter.encode(f"{q} {SUFFIX.texts[0]}") for q in QUERIES]
    assert encoded.queries == QUERIES


def test_evaluation_generates_from_the_suffix_and_judges_the_original_query(tiny_dro):
    datasets, settings = {"harmful": QUERIES}, [PromptSetting.from_text("none"), PromptSetting.from_text("short")]
    sampling = SamplingConfig(max_new_tokens=6)
    plain = evaluate_settings(tiny_dro.model, datasets, settings, EvalConfig(sampling, openings=TINY_OPENINGS), batching=QUIET)
    judge = RecordingJudge()
    attacked = evaluate_settings(
        tiny_dro.model, datasets, settings, EvalConfig(sampling, judge=judge, openings=TINY_OPENINGS, suffix=SUFFIX), batching=QUIET
    )
    assert [r.setting for r in attacked.rows] == ["none + suffix attack", "short + suffix attack"]
    for before, after in zip(plain.outcomes, attacked.outcomes):
        assert [r.token_ids for r in before.responses] != [r.token_ids for r in after.responses]
        assert not np.allclose(before.log_odds, after.log_odds)
        assert [r.query for r in after.responses] == QUERIES
    assert judge.queries and set(judge.queries) == set(QUERIES)  # the reference replies, then each setting's


def test_sweep_and_evaluate_take_a_suffix_file(tiny_dro, tmp_path, query_files, capsys):
    """Both commands score query + suffix (the refusal log-odds by hand, from the joined texts) and name the rows by it."""
    directory = tiny_dro.directory
    suffix = tmp_path / "gcg.json"
    texts = [f"!! now {i}" for i in range(len(HARMFUL))]  # one per query, each its own
    suffix.write_text(json.dumps({"suffix": texts}), encoding="utf-8")
    openings = tmp_path / "openings.json"
    openings.write_text(json.dumps({"refusal": list(TINY_OPENINGS.refusal), "compliant": list(TINY_OPENINGS.compliant)}), encoding="utf-8")

    def mean_log_odds(queries, suffixed):
        joined = [f"{q} {t}" for q, t in zip(queries, texts)] if suffixed else queries
        return float(np.mean(score_refusal(tiny_dro.model, encode_queries(tiny_dro.model, joined, "none"), TINY_OPENINGS, QUIET).log_odds))

    out = tmp_path / "sweep"
    assert main(["sweep", "--models", str(directory), "--prompts", "none", "--datasets", str(query_files[0]), "--max-new-tokens", "4",
                 "--suffix-file", str(suffix), "--openings", str(openings), "--out", str(out)]) == 0
    rows = json.loads((out / "sweep.json").read_text())
    assert [(r["setting"], r["error"]) for r in rows] == [("none + suffix gcg", None)]
    attacked = mean_log_odds(HARMFUL, True)
    assert rows[0]["mean_refusal_log_odds"] == pytest.approx(attacked, abs=1e-4)
    assert attacked != pytest.approx(mean_log_odds(HARMFUL, False), abs=1e-3)  # the suffix shows in the value
    capsys.readouterr()
    eval_md = tmp_path / "eval.md"
    assert main(["evaluate", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
                 "--settings", "none", "--max-new-tokens", "4", "--suffix-file", str(suffix), "--openings", str(openings),
                 "--out", str(eval_md)]) == 0
    rows = {r["dataset"]: r for r in json.loads(eval_md.with_suffix(".json").read_text())}
    assert {name: r["setting"] for name, r in rows.items()} == {"harmful": "none + suffix gcg", "harmless": "none + suffix gcg"}
    assert rows["harmful"]["mean_refusal_log_odds"] == pytest.approx(attacked, abs=1e-4)
    assert rows["harmless"]["mean_refusal_log_odds"] == pytest.approx(mean_log_odds(HARMLESS, True), abs=1e-4)
    suffix.write_text(json.dumps(["one", "two"]), encoding="utf-8")
    eval_md.unlink()
    code = main(["evaluate", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
                 "--settings", "none", "--suffix-file", str(suffix), "--out", str(eval_md)])
    assert code == 2
    assert f"gcg: 2 suffixes, one per query, but harmful has {len(HARMFUL)} queries" in capsys.readouterr().err
    assert not eval_md.exists()
