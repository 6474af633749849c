"""Refusal labels per (query, prompt setting): the sampled compliance rate and the refusal log-odds."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.judging.judges import SafetyJudge
from dro_jax.inference.refusal_score import refusal_log_odds
from dro_jax.judging.responses import Measuring, judged_responses
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting, as_prompt_setting
from dro_jax.loading import LoadedModel


@dataclasses.dataclass(frozen=True)
class Label:
    """compliance_rate: share of sampled responses the judge does not call a refusal (with a judge model:
    that are also judged unsafe and longer than two lines, the paper's rule for harmful queries); None
    without samples. refusal_log_odds: see `dro_jax.inference.refusal_score`."""

    query_index: int
    query: str
    setting: str
    num_samples: int
    compliance_rate: float | None
    refusal_log_odds: float


def compliance_rates(
    model: LoadedModel,
    encoded: EncodedQueries,
    sampling: SamplingConfig,
    measuring: Measuring,
    batching: Batching = Batching(),
    query_numbers: Sequence[int] | None = None,
    judge_model: SafetyJudge | None = None,
    longest: int | None = None,
) -> np.ndarray:
    """[n] share of each encoded query's sampled responses (`measuring.num_samples`) that comply: that the
    string judge does not call a refusal and, when `judge_model` is given (every query is then a
    harmful one), that also pass the rest of the paper's rule (`Response.complied`). With `longest`, only each
    query's that many longest responses by words count (the reference's label: 20 of 25); `query_numbers`: see
    `generate_responses`."""
    complied = np.zeros(len(encoded))
    for response in judged_responses(model, encoded, sampling, measuring, batching, query_numbers, judge_model, longest):
        complied[response.query_index] += response.complied
    return complied / (measuring.num_samples if longest is None else longest)


def label_queries(
    model: LoadedModel,
    queries: Sequence[str],
    settings: Sequence[PromptSetting | str],
    sampling: SamplingConfig,
    measuring: Measuring,
    judge_model: SafetyJudge | None = None,
    source: str = "queries",
    batching: Batching = Batching(),
) -> list[Label]:
    """Labels for every query under every setting (`none`, a safety prompt name, custom text, or a soft prompt):
    the refusal log-odds of `measuring.openings` and, unless `measuring.num_samples` is 0, the compliance rate of
    that many samples; with `judge_model`, every query is judged as a harmful one."""
    labels = []
    for setting in map(as_prompt_setting, settings):
        encoded = encode_queries(model, queries, setting, source)
        log_odds = refusal_log_odds(model, encoded, measuring.openings, batching)
        compliance: list[float | None] = [None] * len(queries)
        if measuring.num_samples > 0:
            compliance = list(compliance_rates(model, encoded, sampling, measuring, batching, judge_model=judge_model))
        labels += [
            Label(i, q, setting.name, measuring.num_samples, compliance[i], float(log_odds[i])) for i, q in enumerate(queries)
        ]
    return labels
