"""Helpfulness: does a safety prompt keep a model useful on everyday instructions?

Every prompt setting answers the same instruction set (greedy by default).
Without a judge, quality is measured as in every evaluation (see
`dro_jax.evaluation.quality`): reply drift against no prompt, degenerate
answers, and answers the string judge reads as refusals (on harmless
instructions, each one is an over-refusal). With a pairwise judge (see
`dro_jax.judging.pairwise`), each setting's answers are also compared
with the reference setting's:

- every pair is judged in both orders, the setting's answer first and then
  second, and its preference is the mean of P(setting's answer preferred)
  over the two orders, so a judge that favours a position gives 0.5;
- an answer identical to the reference's is a tie (0.5) and is not judged;
- win rate: the mean preference over instructions; wins (losses): the
  instructions where the judge prefers the setting's (reference's) answer in
  both orders; ties: the rest (identical answers, or a verdict that follows
  the order).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_jsonl
from dro_jax.common.tables import markdown_table, write_tables
from dro_jax.evaluation.evaluate import EvalConfig, evaluate_settings
from dro_jax.evaluation.quality import DegenerationCounts, DegenerationRule
from dro_jax.evaluation.rows import EvalRow
from dro_jax.evaluation.sweep_output import prepare_output_dir
from dro_jax.inference.batched import Batching
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting
from dro_jax.judging.pairwise import PairwiseJudge
from dro_jax.judging.responses import Response
from dro_jax.loading import LoadedModel

FILE_NAMES = ("helpfulness.md", "helpfulness.csv", "helpfulness.json", "answers.jsonl")


@dataclasses.dataclass(frozen=True)
class WinRate:
    """One setting against the reference setting (counted as the module docstring says)."""

    win_rate: float
    wins: int
    ties: int
    losses: int


def pairwise_preferences(
    judge: PairwiseJudge, instructions: Sequence[str], answers: Sequence[str], reference: Sequence[str], progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per instruction, P(answer preferred over the reference answer) with the answer shown first and shown
    second ([n] each); 0.5 in both for identical answers. Both orders go to the judge in one batched pass."""
    if not len(instructions) == len(answers) == len(reference):
        raise DroJaxError(f"{len(instructions)} instructions for {len(answers)} answers and {len(reference)} reference answers")
    shown_first, shown_second = np.full(len(answers), 0.5), np.full(len(answers), 0.5)
    differ = [i for i, (a, r) in enumerate(zip(answers, reference)) if a != r]
    if differ:
        asked = [instructions[i] for i in differ]
        mine, theirs = [answers[i] for i in differ], [reference[i] for i in differ]
        verdicts = np.asarray(judge.first_preferred(asked + asked, mine + theirs, theirs + mine, progress), np.float64)
        shown_first[differ], shown_second[differ] = verdicts[: len(differ)], 1.0 - verdicts[len(differ) :]
    return shown_first, shown_second


def win_rate(shown_first: np.ndarray, shown_second: np.ndarray) -> WinRate:
    """The win rate and counts of the module docstring, from the two orders' preferences."""
    preference = (shown_first + shown_second) / 2
    wins = int(np.sum((shown_first > 0.5) & (shown_second > 0.5)))
    losses = int(np.sum((shown_first < 0.5) & (shown_second < 0.5)))
    return WinRate(float(np.mean(preference)), wins, len(preference) - wins - losses, losses)


@dataclasses.dataclass(frozen=True)
class HelpfulnessRow:
    """One prompt setting on the instruction set; the win-rate fields are None without a judge.

    reply_drift: nats per token against no prompt (see `dro_jax.evaluation.quality`);
    refused_answers: answers the string judge reads as refusals.
    """

    setting: str
    num_instructions: int
    refused_answers: int
    mean_answer_tokens: float
    reply_drift: float
    degenerate_answers: int
    looping_answers: int
    shouting_answers: int
    reference_setting: str | None = None
    win_rate: float | None = None
    wins: int | None = None
    ties: int | None = None
    losses: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Helpfulness:
    """What `measure_helpfulness` found: the rows of the tables and every answer."""

    rows: list[HelpfulnessRow]
    answers: list[dict]  # one record per (setting, instruction), as answers.jsonl holds them


def check_settings(settings: Sequence[PromptSetting], reference_setting: str) -> None:
    """Each setting once, and the reference among them: results are keyed by setting name."""
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise DroJaxError(f"a setting is given twice: {', '.join(names)}")
    if reference_setting not in names:
        raise DroJaxError(f"unknown reference setting {reference_setting!r}: it must be one of the settings ({', '.join(names)})")


ANSWERS = EvalConfig(SamplingConfig(max_new_tokens=200))  # one greedy answer of up to 200 tokens per instruction


def measure_helpfulness(
    model: LoadedModel,
    instructions: Sequence[str],
    settings: Sequence[PromptSetting],
    reference_setting: str,
    judge: PairwiseJudge | None = None,
    config: EvalConfig = ANSWERS,
    source: str = "instructions",
    batching: Batching = Batching(),
) -> Helpfulness:
    """Answers of every setting to `instructions` (one each, decoded with `config.sampling` and `config.seed`),
    their quality, and, with `judge`, each setting's win rate against `reference_setting` (a setting name among
    `settings`)."""
    check_settings(settings, reference_setting)
    if not instructions:
        raise DroJaxError(f"{source}: no instructions")
    evaluation = evaluate_settings(model, {source: instructions}, settings, config, batching=batching)
    answers = {outcome.setting: outcome.responses for outcome in evaluation.outcomes}
    reference = [r.text for r in answers[reference_setting]]
    rows, records = [], []
    for row in evaluation.rows:
        responses = answers[row.setting]
        preferences = None
        if judge is not None:
            preferences = pairwise_preferences(judge, instructions, [r.text for r in responses], reference, batching.progress)
        rows.append(_row(row, responses, reference_setting if judge else None, preferences))
        records += _records(row.setting, responses, config.degeneration, preferences)
    return Helpfulness(rows, records)


def _row(
    row: EvalRow, responses: Sequence[Response], reference: str | None, preferences: tuple[np.ndarray, np.ndarray] | None
) -> HelpfulnessRow:
    score = None if preferences is None else win_rate(*preferences)
    return HelpfulnessRow(
        row.setting, row.num_queries, row.refused_responses, float(np.mean([r.num_tokens for r in responses])), row.reply_drift,
        row.degenerate_responses, row.looping_responses, row.shouting_responses, reference,
        **({} if score is None else dataclasses.asdict(score)),
    )


def _records(
    setting: str, responses: Sequence[Response], rule: DegenerationRule, preferences: tuple[np.ndarray, np.ndarray] | None
) -> list[dict]:
    """answers.jsonl lines: with a judge, P(preferred over the reference answer) shown first and shown second."""
    records = []
    for r in responses:
        record = {"setting": setting, "index": r.query_index, "instruction": r.query, "answer": r.text, "num_tokens": r.num_tokens,
                  "refusal": r.refusal, "degenerate": rule.degenerate(r.text)}
        if preferences is not None:
            record["preferred_shown_first"] = float(preferences[0][r.query_index])
            record["preferred_shown_second"] = float(preferences[1][r.query_index])
        records.append(record)
    return records


def helpfulness_markdown(rows: Sequence[HelpfulnessRow]) -> str:
    """One table row per setting; the win-rate columns only when a judge compared the answers."""
    judged = any(row.win_rate is not None for row in rows)
    header = ["setting", "instructions", "refused answers", "mean answer tokens", "reply drift (nats/token)", "degenerate (loop / shout)"]
    if judged:
        header += [f"win rate vs {rows[0].reference_setting}", "wins / ties / losses"]
    table = []
    for row in rows:
        cells = [
            row.setting, str(row.num_instructions), f"{row.refused_answers}/{row.num_instructions}", f"{row.mean_answer_tokens:.1f}",
            f"{row.reply_drift:+.3f}",
            DegenerationCounts(row.degenerate_answers, row.looping_answers, row.shouting_answers).cell(row.num_instructions),
        ]
        if judged:
            cells += [f"{row.win_rate:.1%}", f"{row.wins} / {row.ties} / {row.losses}"]
        table.append(cells)
    return markdown_table(header, table)


def prepare_helpfulness_dir(directory: str | Path) -> Path:
    """Creates the output directory and checks its files can be written, before any work."""
    return prepare_output_dir(directory, FILE_NAMES)


def write_helpfulness(result: Helpfulness, directory: Path) -> list[Path]:
    """helpfulness.md, .csv and .json (one row per setting) and answers.jsonl, each written atomically."""
    paths = write_tables(directory / "helpfulness", result.rows, HelpfulnessRow, helpfulness_markdown(result.rows))
    write_jsonl(directory / "answers.jsonl", result.answers)
    return [*paths, directory / "answers.jsonl"]
