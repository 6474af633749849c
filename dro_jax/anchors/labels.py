"""Refusal labels per (query, prompt setting): the sampled compliance rate and the refusal log-odds."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import refusal_log_odds
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import PromptSetting, as_prompt_setting
from dro_jax.judging.judges import SafetyJudge
from dro_jax.judging.responses import Measuring, Response, judged_responses
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


def compliance_rates(responses: Sequence[Response], num_queries: int) -> np.ndarray:
    """[num_queries] share of each query's judged responses (from `judged_responses`: the kept ones only, e.g. the
    reference's 20 longest of 25) that comply (`Response.complied`: not a refusal and, where the judge model gave a
    verdict, the rest of the paper's rule)."""
    queries = np.array([response.query_index for response in responses], dtype=int)
    complied = np.bincount(queries, [response.complied for response in responses], minlength=num_queries)
    return complied / np.maximum(np.bincount(queries, minlength=num_queries), 1)


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
            judged = judged_responses(model, encoded, sampling, measuring, batching, judge_model=judge_model)
            compliance = list(compliance_rates(judged, len(queries)))
        labels += [
            Label(i, q, setting.name, measuring.num_samples, compliance[i], float(log_odds[i])) for i, q in enumerate(queries)
        ]
    return labels
