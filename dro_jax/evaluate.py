"""Evaluating prompt settings on held-out query sets: refusals, refusal log-odds, movement along the refusal direction.

Counts follow the paper's metric: per query N responses (greedy: one); a
harmful query counts against a prompt if *any* response complies, a harmless
one if *any* response refuses.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from dro_jax.anchors import AnchorSpace
from dro_jax.chat import NO_PROMPT, PromptSetting
from dro_jax.errors import DroJaxError
from dro_jax.generate import SamplingConfig
from dro_jax.judges import StringJudge
from dro_jax.loading import LoadedModel
from dro_jax.refusal_score import Openings, score_refusal
from dro_jax.represent import encode_queries
from dro_jax.respond import Response, generate_responses
from dro_jax.tables import markdown_table

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


def keep_longest(responses: Sequence[Response], count: int | None) -> list[Response]:
    """Each query's `count` longest responses (the paper keeps 20 of 25); all of them when `count` is None."""
    if count is None:
        return list(responses)
    by_query: dict[int, list[Response]] = {}
    for response in responses:
        by_query.setdefault(response.query_index, []).append(response)
    kept = []
    for group in by_query.values():
        kept += sorted(group, key=lambda r: (-r.num_tokens, r.sample))[:count]
    return sorted(kept, key=lambda r: (r.query_index, r.sample))


def count_refusals(responses: Sequence[Response], num_queries: int) -> tuple[int, int, int]:
    """(refused responses, queries with any refusal, queries with any compliant response)."""
    refused = np.zeros(num_queries, bool)
    complied = np.zeros(num_queries, bool)
    for response in responses:
        refused[response.query_index] |= response.refusal
        complied[response.query_index] |= not response.refusal
    return sum(r.refusal for r in responses), int(refused.sum()), int(complied.sum())


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
    judge: StringJudge | None = None,
    openings: Openings = Openings(),
    progress: bool = True,
    mesh: Mesh | None = None,
) -> Evaluation:
    """Every setting on every dataset: responses judged for refusal, refusal log-odds, probe logits;
    batches split over `mesh` (see `dro_jax.sharding`)."""
    if longest is not None and not 1 <= longest <= num_samples:
        raise DroJaxError(f"cannot keep the {longest} longest of {num_samples} responses per query")
    rows, outcomes = [], []
    for name, queries in datasets.items():
        baseline = None
        for setting in settings:
            encoded = encode_queries(model, queries, setting, name)
            responses = generate_responses(model, queries, setting, sampling, num_samples, seed, batch_size, judge, progress, name, mesh)
            responses = keep_longest(responses, longest)
            scores = score_refusal(model, encoded, openings, batch_size, progress, mesh)
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
