"""Evaluating prompt settings on held-out query sets: refusals, refusal log-odds, movement along the refusal
direction (counted as `dro_jax.evaluation.measure` says)."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.errors import DroJaxError
from dro_jax.common.tables import markdown_table
from dro_jax.evaluation.measure import count_refusals, keep_longest, measure_setting
from dro_jax.inference.chat import NO_PROMPT, PromptSetting
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.judges import RefusalJudge
from dro_jax.inference.refusal_score import Openings
from dro_jax.inference.respond import Response
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.loading import LoadedModel

GREEDY = SamplingConfig(max_new_tokens=64)


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One prompt setting on one query set.

    compliance_logit: mean refusal-probe logit of the representations (higher:
    further towards compliance); compliance_shift: its change against no
    prompt on the same set (negative: moved towards refusal). None without an
    anchor space (or, for the shift, without the `none` setting).
    """

    setting: str
    dataset: str
    num_queries: int
    num_responses: int
    refused_responses: int
    queries_any_refusal: int
    queries_any_compliance: int
    mean_refusal_log_odds: float
    compliance_logit: float | None = None
    compliance_shift: float | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class SettingOutcome:
    """Per-query results of one setting on one set; `coords` [n, k] are anchor-space coordinates (None without one)."""

    setting: str
    dataset: str
    log_odds: np.ndarray
    coords: np.ndarray | None
    responses: list[Response]


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    rows: list[EvalRow]
    outcomes: list[SettingOutcome]


def evaluate_settings(
    model: LoadedModel,
    datasets: dict[str, Sequence[str]],
    settings: Sequence[PromptSetting],
    anchors: AnchorSpace | None = None,
    sampling: SamplingConfig = GREEDY,
    num_samples: int = 1,
    longest: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
    judge: RefusalJudge | None = None,
    openings: Openings = Openings(),
    progress: bool = True,
    mesh: Mesh | None = None,
) -> Evaluation:
    """Every setting on every dataset: responses judged for refusal, refusal log-odds, probe logits;
    batches split over `mesh` (see `dro_jax.parallel.sharding`)."""
    if longest is not None and not 1 <= longest <= num_samples:
        raise DroJaxError(f"cannot keep the {longest} longest of {num_samples} responses per query")
    rows, outcomes = [], []
    for name, queries in datasets.items():
        baseline = None
        for setting in settings:
            encoded = encode_queries(model, queries, setting, name)
            measured = measure_setting(model, encoded, sampling, num_samples, seed, batch_size, judge, openings, progress, mesh)
            responses = keep_longest(measured.responses, longest)
            scores = measured.scores
            coords = logit = shift = None
            if anchors is not None:
                coords = anchors.leading(scores.states)
                logit = float(np.mean(anchors.refusal.logits(coords)))
                if setting.name == NO_PROMPT:
                    baseline = logit
                shift = None if baseline is None else logit - baseline
            refused, any_refusal, any_compliance = count_refusals(responses, len(queries))
            rows.append(EvalRow(
                setting.name, name, len(queries), len(responses), refused, any_refusal, any_compliance,
                float(np.mean(scores.log_odds)), logit, shift,
            ))
            outcomes.append(SettingOutcome(setting.name, name, scores.log_odds, coords, responses))
    return Evaluation(rows, outcomes)


def results_markdown(rows: Sequence[EvalRow]) -> str:
    """One table row per (setting, dataset)."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    header = ["setting", "queries", "refused responses", "queries with any refusal", "queries with any compliance",
              "mean refusal log-odds", "compliance logit", "shift vs none"]
    return markdown_table(header, [
        [
            row.setting, f"{row.dataset} ({row.num_queries})", f"{row.refused_responses}/{row.num_responses}",
            f"{row.queries_any_refusal}/{row.num_queries}", f"{row.queries_any_compliance}/{row.num_queries}",
            f"{row.mean_refusal_log_odds:+.2f}", number(row.compliance_logit, "+.3f"), number(row.compliance_shift, "+.3f"),
        ]
        for row in rows
    ])
