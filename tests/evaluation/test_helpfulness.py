"""Helpfulness: the pairwise win rate (both orders, position bias cancelled), and `dro-jax helpfulness` end to end."""

import json

import jax
import numpy as np
import pytest

from dro_jax.cli.main import main
from dro_jax.common.errors import DroJaxError
from dro_jax.evaluation.helpfulness import WinRate, measure_helpfulness, pairwise_preferences, win_rate
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.pairwise import ModelPairwiseJudge
from helpers import HARMLESS, QUIET

INSTRUCTIONS = ["Bake bread.", "Write a poem.", "Explain a lock.", "Say hello."]
SETTING = ["good: " + i for i in INSTRUCTIONS]  # the setting's answers
REFERENCE = ["bad: " + i for i in INSTRUCTIONS]


class FakeJudge:
    """P(first answer preferred) from a rule on the two answers; records every call."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def first_preferred(self, instructions, first, second, progress=False):
        self.calls.append((list(instructions), list(first), list(second)))
        return np.array([self.rule(a, b) for a, b in zip(first, second)], float)


def _score(judge, answers=SETTING, reference=REFERENCE):
    return win_rate(*pairwise_preferences(judge, INSTRUCTIONS, answers, reference))


def test_a_judge_that_prefers_the_settings_answers_gives_a_win_rate_of_one():
    assert _score(FakeJudge(lambda a, b: float(a.startswith("good")))) == WinRate(1.0, 4, 0, 0)


def test_a_judge_that_prefers_the_reference_answers_gives_a_win_rate_of_zero():
    assert _score(FakeJudge(lambda a, b: float(b.startswith("good")))) == WinRate(0.0, 0, 0, 4)


@pytest.mark.parametrize("bias", [1.0, 0.8, 0.0])
def test_a_judge_that_only_looks_at_the_position_cancels_out(bias):
    """Always answer "A" (or lean to it, or always "B"): both orders together give one half, and no wins."""
    assert _score(FakeJudge(lambda a, b: bias)) == WinRate(0.5, 0, 4, 0)


def test_a_position_bias_on_top_of_a_preference_keeps_the_wins():
    def rule(a, b):  # logit +2 for the "good" answer, +1 for whichever is shown first
        return 1 / (1 + np.exp(-((2 if a.startswith("good") else -2) + 1)))

    score = _score(FakeJudge(rule))
    assert (score.wins, score.ties, score.losses) == (4, 0, 0)
    assert score.win_rate == pytest.approx((1 / (1 + np.exp(-3)) + 1 - 1 / (1 + np.exp(1))) / 2)


def test_both_orders_go_to_the_judge_in_one_call_and_identical_answers_are_ties_unjudged():
    judge = FakeJudge(lambda a, b: float(a.startswith("good")))
    answers = SETTING[:2] + REFERENCE[2:]  # the last two match the reference
    assert _score(judge, answers) == WinRate(0.75, 2, 2, 0)
    assert judge.calls == [(INSTRUCTIONS[:2] * 2, SETTING[:2] + REFERENCE[:2], REFERENCE[:2] + SETTING[:2])]


def test_settings_must_name_the_reference_once(tiny_dro):
    none, short = PromptSetting.from_text("none"), PromptSetting.from_text("short")
    with pytest.raises(DroJaxError, match="unknown reference setting 'default': it must be one of the settings \\(none, short\\)"):
        measure_helpfulness(tiny_dro.model, INSTRUCTIONS, [none, short], "default", batching=QUIET)
    with pytest.raises(DroJaxError, match="a setting is given twice"):
        measure_helpfulness(tiny_dro.model, INSTRUCTIONS, [none, none], "none", batching=QUIET)


@pytest.fixture()
def command(tiny_dro, tmp_path):
    """Factory: `dro-jax helpfulness` on the tiny model and three short instructions, into tmp_path / name."""
    instructions = tmp_path / "everyday.txt"
    instructions.write_text("\n".join(HARMLESS[:3]), encoding="utf-8")

    def make(name, *extra):
        return ["helpfulness", "--model", str(tiny_dro.directory), "--instructions", str(instructions), "--settings", "none", "short",
                "--max-new-tokens", "4", "--out", str(tmp_path / name), *extra]

    return make


def test_the_command_without_a_judge_writes_quality_per_setting(command, tmp_path):
    assert main(command("plain")) == 0
    out = tmp_path / "plain"
    rows = json.loads((out / "helpfulness.json").read_text())
    assert [r["setting"] for r in rows] == ["none", "short"]
    assert rows[0]["reply_drift"] == 0 and all(r["num_instructions"] == 3 and r["win_rate"] is None for r in rows)
    answers = [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]
    assert [(a["setting"], a["instruction"]) for a in answers] == [(s, q) for s in ("none", "short") for q in HARMLESS[:3]]
    assert "win rate" not in (out / "helpfulness.md").read_text()
    assert (out / "helpfulness.csv").read_text().splitlines()[0].startswith("setting,num_instructions,")


def test_the_command_with_a_judge_model_reports_win_rates(command, tiny_dro, tmp_path):
    template = tmp_path / "judge.txt"
    template.write_text("{instruction}\nA: {answer_a}\nB: {answer_b}\nBetter:", encoding="utf-8")
    assert main(command("judged", "--judge-model", str(tiny_dro.directory), "--judge-template", str(template))) == 0
    out = tmp_path / "judged"
    rows = {r["setting"]: r for r in json.loads((out / "helpfulness.json").read_text())}
    assert (rows["none"]["win_rate"], rows["none"]["ties"]) == (0.5, 3)  # the reference against itself
    short = rows["short"]
    assert short["reference_setting"] == "none"
    # The table's figures are the written preferences', in both orders.
    answers = [a for a in map(json.loads, (out / "answers.jsonl").read_text().splitlines()) if a["setting"] == "short"]
    first, second = (np.asarray([a[f"preferred_shown_{order}"] for a in answers]) for order in ("first", "second"))
    assert len(first) == 3 and not np.allclose(first, second)
    want = win_rate(first, second)
    assert (short["win_rate"], short["wins"], short["ties"], short["losses"]) == (pytest.approx(want.win_rate), want.wins, want.ties, want.losses)
    assert "win rate vs none" in (out / "helpfulness.md").read_text()


def test_the_model_judge_reads_a_and_b(tiny_dro):
    judge = ModelPairwiseJudge(tiny_dro.model, "{instruction} A: {answer_a} B: {answer_b} {x}", batch_size=4)
    rendered = tiny_dro.model.tokenizer.decode(judge._encode("Hi", "{answer_b}", "No"))
    assert "Hi A: {answer_b} B: No {x}" in rendered  # answers are inserted once, other braces kept
    p = judge.first_preferred(["Hi"] * 2, ["Hello", "No"], ["No", "Hello"])
    # By hand: each prompt alone through the model, p(A) / (p(A) + p(B)) from the next-token distribution.
    from dro_jax.models import forward

    for row, (a, b) in enumerate((("Hello", "No"), ("No", "Hello"))):
        ids = np.asarray([judge._encode("Hi", a, b)], np.int32)
        logits = forward(tiny_dro.model.params, tiny_dro.model.config, ids, np.ones_like(ids), output_logits=True).logits[0, -1]
        log_probs = np.asarray(jax.nn.log_softmax(logits))
        first, second = (tiny_dro.model.tokenizer.encode(word, add_special_tokens=False) for word in ("A", "B"))
        assert len(first) == len(second) == 1
        want = 1 / (1 + np.exp(log_probs[second[0]] - log_probs[first[0]]))
        assert p[row] == pytest.approx(want, rel=1e-4)  # float32 logits: a batch of two against each prompt alone
    assert p[0] != pytest.approx(p[1])  # the order of the answers reaches the judge


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--reference-setting", "mistral"), "unknown reference setting 'mistral'"),
        (("--settings", "none", "soft:absent.safetensors"), "absent.safetensors"),
        (("--judge-template", "TEMPLATE"), "it lacks {answer_b}"),
        (("--instructions", "EMPTY"), "the query file is empty"),
    ],
)
def test_command_errors(command, tmp_path, capsys, extra, message):
    (tmp_path / "template.txt").write_text("{instruction} {answer_a}", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    files = {"TEMPLATE": str(tmp_path / "template.txt"), "EMPTY": str(tmp_path / "empty.txt")}
    args = command("failed")
    for flag in ("--settings", "--instructions"):  # a repeated option replaces the fixture's
        if flag in extra:
            at = args.index(flag)
            args = args[:at] + args[at + (3 if flag == "--settings" else 2):]
    assert main(args + [files.get(e, e) for e in extra]) == 2
    assert message in capsys.readouterr().err
