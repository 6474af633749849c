"""The anchor stage: representations and refusal labels of the anchor queries under every prompt setting."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dro_jax.anchors import AnchorSpace, FitConfig, fit_anchor_space
from dro_jax.chat import PROMPT_SETTINGS
from dro_jax.errors import DroJaxError
from dro_jax.generate import SamplingConfig
from dro_jax.judges import StringJudge
from dro_jax.labels import compliance_rates
from dro_jax.loading import LoadedModel
from dro_jax.refusal_score import Openings, score_refusal
from dro_jax.represent import encode_queries
from dro_jax.queries import check_query_sets

LABELS = ("logodds", "sampled")
# The reference's sampling for labels, with fewer new tokens: the judge reads only the opening paragraphs.
LABEL_SAMPLING = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=64, min_new_tokens=10)


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """`logodds`: compliance target sigmoid(-refusal log-odds), generation-free. `sampled`: the share
    of `num_samples` sampled responses that are not refusals (the paper's label)."""

    settings: tuple[str, ...] = PROMPT_SETTINGS
    label: str = "logodds"
    num_samples: int = 5
    sampling: SamplingConfig = LABEL_SAMPLING
    seed: int = 42
    fit: FitConfig = FitConfig()
    openings: Openings = Openings()

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise DroJaxError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")
        if self.label == "sampled" and self.num_samples < 1:
            raise DroJaxError("the sampled label needs at least one sample per query")


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorData:
    """Row order: for each setting, the harmful queries then the harmless ones."""

    states: np.ndarray  # [settings * n, h]
    compliance: np.ndarray  # [settings * n] targets in [0, 1]
    refusal_log_odds: np.ndarray  # [settings * n]
    harmless: np.ndarray  # [settings * n]
    settings: list[str]  # per row


def collect_anchor_data(
    model: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    config: AnchorConfig = AnchorConfig(),
    batch_size: int = 32,
    judge: StringJudge | None = None,
    progress: bool = True,
) -> AnchorData:
    check_query_sets(harmful, harmless)
    queries = list(harmful) + list(harmless)
    flags = np.array([0] * len(harmful) + [1] * len(harmless), np.float32)
    states, compliance, log_odds, harmless_rows, names = [], [], [], [], []
    for setting in config.settings:
        scores = score_refusal(model, encode_queries(model, queries, setting), config.openings, batch_size, progress)
        states.append(scores.states)
        log_odds.append(scores.log_odds.astype(np.float32))
        if config.label == "sampled":
            rates = compliance_rates(model, queries, setting, config.sampling, config.num_samples, config.seed, batch_size, judge, progress)
            compliance.append(rates.astype(np.float32))
        else:
            compliance.append((1 / (1 + np.exp(scores.log_odds))).astype(np.float32))
        harmless_rows.append(flags)
        names += [setting] * len(queries)
    return AnchorData(np.concatenate(states), np.concatenate(compliance), np.concatenate(log_odds), np.concatenate(harmless_rows), names)


def build_anchor_space(
    model: LoadedModel,
    harmful: Sequence[str],
    harmless: Sequence[str],
    config: AnchorConfig = AnchorConfig(),
    batch_size: int = 32,
    judge: StringJudge | None = None,
    progress: bool = True,
) -> tuple[AnchorSpace, dict, AnchorData]:
    """Collects the anchor data and fits the space; the report holds the probes' held-out metrics."""
    data = collect_anchor_data(model, harmful, harmless, config, batch_size, judge, progress)
    metadata = {
        "model": model.source,
        "settings": list(config.settings),
        "num_harmful": len(harmful),
        "num_harmless": len(harmless),
        "num_samples": config.num_samples if config.label == "sampled" else 0,
    }
    space, report = fit_anchor_space(data.states, data.compliance, data.harmless, config.fit, config.label, metadata)
    return space, report, data
