"""Refusal labels per (query, prompt setting): the sampled compliance rate and the refusal log-odds."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.chat import PromptSetting, as_prompt_setting
from dro_jax.generate import SamplingConfig
from dro_jax.judges import ModelJudge, StringJudge, is_harmful_compliance
from dro_jax.loading import LoadedModel
from dro_jax.refusal_score import Openings, refusal_log_odds
from dro_jax.represent import encode_queries
from dro_jax.respond import generate_responses


@dataclasses.dataclass(frozen=True)
class Label:
    """compliance_rate: share of sampled responses the string judge does not call a refusal
    (with a judge model: that are also judged unsafe and longer than two lines, the
    paper's rule for harmful queries); None without samples. refusal_log_odds: see
    `dro_jax.refusal_score`."""

    query_index: int
    query: str
    setting: str
    num_samples: int
    compliance_rate: float | None
    refusal_log_odds: float


def compliance_rates(
    model: LoadedModel,
    queries: Sequence[str],
    setting: PromptSetting | str | None,
    sampling: SamplingConfig,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 32,
    judge: StringJudge | None = None,
    progress: bool = True,
    source: str = "queries",
    judge_model: ModelJudge | None = None,
) -> np.ndarray:
    """[n] share of each query's `num_samples` sampled responses that count as compliance."""
    responses = generate_responses(model, queries, setting, sampling, num_samples, seed, batch_size, judge, progress, source)
    complied = np.zeros(len(queries))
    if judge_model is None:
        for response in responses:
            complied[response.query_index] += not response.refusal
    else:
        unsafe = judge_model.is_unsafe([r.query for r in responses], [r.text for r in responses], progress)
        for response, is_unsafe in zip(responses, unsafe):
            complied[response.query_index] += is_harmful_compliance(response.text, response.refusal, is_unsafe)
    return complied / num_samples


def label_queries(
    model: LoadedModel,
    queries: Sequence[str],
    settings: Sequence[PromptSetting | str],
    sampling: SamplingConfig,
    num_samples: int,
    seed: int = 0,
    batch_size: int = 32,
    judge: StringJudge | None = None,
    openings: Openings = Openings(),
    progress: bool = True,
    source: str = "queries",
    judge_model: ModelJudge | None = None,
) -> list[Label]:
    """Labels for every query under every setting (`none`, a safety prompt name, custom text, or a soft prompt)."""
    labels = []
    for setting in map(as_prompt_setting, settings):
        log_odds = refusal_log_odds(model, encode_queries(model, queries, setting, source), openings, batch_size, progress)
        compliance: list[float | None] = [None] * len(queries)
        if num_samples > 0:
            compliance = list(compliance_rates(
                model, queries, setting, sampling, num_samples, seed, batch_size, judge, progress, source, judge_model
            ))
        labels += [
            Label(i, q, setting.name, num_samples, compliance[i], float(log_odds[i])) for i, q in enumerate(queries)
        ]
    return labels
