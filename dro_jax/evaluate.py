"""Evaluating prompt settings on held-out query sets: refusals, refusal log-odds, movement along the refusal direction."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.anchors import AnchorSpace
from dro_jax.chat import NO_PROMPT, PromptSetting
from dro_jax.generate import SamplingConfig
from dro_jax.judges import StringJudge
from dro_jax.loading import LoadedModel
from dro_jax.refusal_score import Openings, score_refusal
from dro_jax.represent import encode_queries
from dro_jax.respond import generate_responses


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
    greedy_refusals: int
    mean_refusal_log_odds: float
    compliance_logit: float | None = None
    compliance_shift: float | None = None


def evaluate_settings(
    model: LoadedModel,
    datasets: dict[str, Sequence[str]],
    settings: Sequence[PromptSetting],
    anchors: AnchorSpace | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 32,
    judge: StringJudge | None = None,
    openings: Openings = Openings(),
    progress: bool = True,
) -> list[EvalRow]:
    """Every setting on every dataset: greedy responses judged for refusal, log-odds, probe logits."""
    greedy = SamplingConfig(max_new_tokens=max_new_tokens)
    rows = []
    for name, queries in datasets.items():
        baseline = None
        for setting in settings:
            encoded = encode_queries(model, queries, setting, name)
            responses = generate_responses(model, queries, setting, greedy, 1, 0, batch_size, judge, progress, name)
            scores = score_refusal(model, encoded, openings, batch_size, progress)
            log_odds = scores.log_odds
            logit = shift = None
            if anchors is not None:
                logit = float(np.mean(anchors.refusal.logits(anchors.leading(scores.states))))
                if setting.name == NO_PROMPT:
                    baseline = logit
                shift = None if baseline is None else logit - baseline
            rows.append(EvalRow(setting.name, name, len(queries), sum(r.refusal for r in responses), float(np.mean(log_odds)), logit, shift))
    return rows


def results_markdown(rows: Sequence[EvalRow]) -> str:
    """One table row per (setting, dataset)."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    lines = [
        "| setting | queries | greedy refusals | mean refusal log-odds | compliance logit | shift vs none |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setting} | {row.dataset} ({row.num_queries}) | {row.greedy_refusals}/{row.num_queries} | "
            f"{row.mean_refusal_log_odds:+.2f} | {number(row.compliance_logit, '+.3f')} | {number(row.compliance_shift, '+.3f')} |"
        )
    return "\n".join(lines)
