"""The anchor stage: representations and refusal labels of the anchor queries under every prompt setting,
and the anchor space fitted to them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from dro_jax.anchors.labels import compliance_rates
from dro_jax.anchors.space import AnchorSpace, FitConfig, fit_anchor_space
from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import atomic_output
from dro_jax.common.paths import as_path, local_file
from dro_jax.data.queries import QueryPairs
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.refusal_score import Openings, score_refusal
from dro_jax.inference.sampling import REFERENCE_SAMPLING, SetSampling
from dro_jax.inference.settings import NO_PROMPT, PROMPT_SETTINGS
from dro_jax.judging.judges import RefusalJudge, SafetyJudge
from dro_jax.judging.responses import Measuring, judged_responses
from dro_jax.loading import LoadedModel

LABELS = ("logodds", "sampled")
# The reference's sampling for labels, with fewer new tokens: the judge reads only the opening paragraphs.
LABEL_SAMPLING = dataclasses.replace(REFERENCE_SAMPLING, max_new_tokens=64, min_new_tokens=10)


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """`logodds`: compliance target sigmoid(-refusal log-odds), generation-free. `sampled`: the share
    of `num_samples` sampled responses that are not refusals (the paper's label), decoded per kind of query
    by `sampling`, judged by `judge` (default: the packaged `dro-jax` string judge); with a judge model
    (`judge_model`), the harmful queries' responses must also pass the rest of the paper's rule (see `compliance_rates`).

    `keep_longest`: only each input's that many longest responses (by words) are judged, as the reference
    labels with the 20 longest of its 25 samples (its `pick_best_and_eval` writes the per-query rates its
    `estimate.py` reads); None judges every sample."""

    settings: tuple[str, ...] = PROMPT_SETTINGS
    label: str = "logodds"
    num_samples: int = 5
    keep_longest: int | None = None
    sampling: SetSampling = SetSampling.same(LABEL_SAMPLING)
    seed: int = 42
    fit: FitConfig = FitConfig()
    openings: Openings = Openings()

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise DroJaxError(f"label must be one of {', '.join(LABELS)}, got {self.label!r}")
        if self.label == "sampled" and self.num_samples < 1:
            raise DroJaxError("the sampled label needs at least one sample per query")
        if self.keep_longest is not None and not 1 <= self.keep_longest <= self.num_samples:
            raise DroJaxError(f"cannot keep the {self.keep_longest} longest of {self.num_samples} sampled responses per input")


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorData:
    """Row order: for each setting, the harmful queries then the harmless ones."""

    states: np.ndarray  # [settings * n, h]
    compliance: np.ndarray  # [settings * n] targets in [0, 1]
    refusal_log_odds: np.ndarray  # [settings * n]
    harmless: np.ndarray  # [settings * n]
    settings: list[str]  # per row

    def save(self, path: Path) -> None:
        """One .npz file, written atomically."""
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, states=self.states, compliance=self.compliance, refusal_log_odds=self.refusal_log_odds,
                         harmless=self.harmless, settings=np.array(self.settings))

    @classmethod
    def load(cls, path: Path) -> "AnchorData":
        with local_file(as_path(path)) as local, np.load(local) as saved:
            return cls(saved["states"], saved["compliance"], saved["refusal_log_odds"], saved["harmless"], list(saved["settings"]))

    def rows_of(self, setting: str) -> np.ndarray:
        """Indices of the rows computed under `setting` (harmful, then harmless queries)."""
        return np.array([i for i, name in enumerate(self.settings) if name == setting], np.int64)

    def contrasts(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows under each prompt, the same queries' rows with no prompt): every setting lists the same queries
        in the same order. Empty without the `none` setting."""
        plain = self.rows_of(NO_PROMPT)
        if not len(plain):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        prompted = [self.rows_of(s) for s in dict.fromkeys(self.settings) if s != NO_PROMPT]
        return (np.concatenate(prompted), np.tile(plain, len(prompted))) if prompted else (plain[:0], plain[:0])

    def fit(self, config: FitConfig, label: str, metadata: dict | None = None) -> tuple[AnchorSpace, dict]:
        """The anchor space of this data (see `fit_anchor_space`); refitting saved data needs no model."""
        return fit_anchor_space(
            self.states, self.compliance, self.harmless, config, label, metadata, self.refusal_log_odds, self.contrasts()
        )


def collect_anchor_data(
    model: LoadedModel,
    pairs: QueryPairs,
    config: AnchorConfig = AnchorConfig(),
    judge: RefusalJudge | None = None,
    judge_model: SafetyJudge | None = None,
    batching: Batching = Batching(),
) -> AnchorData:
    """Representations, refusal log-odds and compliance targets of every anchor query under every setting;
    the representations and log-odds come from one forward pass per input. The
    `judge_model` judges the sampled label's responses to the harmful queries only."""
    queries = pairs.queries
    flags = pairs.harmless_flags.astype(np.float32)
    states, compliance, log_odds, harmless_rows, names = [], [], [], [], []
    for setting in config.settings:
        encoded = encode_queries(model, queries, setting)
        scores = score_refusal(model, encoded, config.openings, batching)
        states.append(scores.states)
        log_odds.append(scores.log_odds.astype(np.float32))
        if config.label == "sampled":
            compliance.append(_sampled_compliance(model, encoded, len(pairs.harmful), config, judge, judge_model, batching))
        else:
            compliance.append((1 / (1 + np.exp(scores.log_odds))).astype(np.float32))
        harmless_rows.append(flags)
        names += [setting] * len(queries)
    return AnchorData(np.concatenate(states), np.concatenate(compliance), np.concatenate(log_odds), np.concatenate(harmless_rows), names)


def _sampled_compliance(
    model: LoadedModel, encoded: EncodedQueries, num_harmful: int, config: AnchorConfig, judge: RefusalJudge | None,
    judge_model: SafetyJudge | None, batching: Batching,
) -> np.ndarray:
    """[n] compliance rates of the harmful rows (judged by `judge_model` too, when given), then the
    harmless rows (the string judge alone), each decoded with its own sampling; sample keys use the row's index
    in `encoded`, so they do not depend on the split."""
    parts = (
        (config.sampling.harmful, range(num_harmful), judge_model),
        (config.sampling.harmless, range(num_harmful, len(encoded)), None),
    )
    measuring = Measuring(config.num_samples, config.seed, judge)
    return np.concatenate([
        compliance_rates(
            judged_responses(model, encoded.select(rows), sampling, measuring, batching, rows, set_judge, config.keep_longest), len(rows)
        )
        for sampling, rows, set_judge in parts
    ]).astype(np.float32)


def check_judged_label(config: AnchorConfig, judged: bool) -> None:
    """A judge model judges sampled responses, so it needs the sampled label (checked before it loads)."""
    if judged and config.label != "sampled":
        raise DroJaxError(f"a judge model judges sampled responses: it needs the sampled label, not {config.label!r}")


def build_anchor_space(
    model: LoadedModel,
    pairs: QueryPairs,
    config: AnchorConfig = AnchorConfig(),
    judge: RefusalJudge | None = None,
    judge_model: SafetyJudge | None = None,
    batching: Batching = Batching(),
) -> tuple[AnchorSpace, dict, AnchorData]:
    """Collects the anchor data and fits the space; the report holds the probes' held-out metrics."""
    check_judged_label(config, judge_model is not None)
    data = collect_anchor_data(model, pairs, config, judge, judge_model, batching)
    metadata = {
        "model": model.source,
        "settings": list(config.settings),
        "num_harmful": len(pairs.harmful),
        "num_harmless": len(pairs.harmless),
        "num_samples": config.num_samples if config.label == "sampled" else 0,
        **({} if judge_model is None else {"judge_model": judge_model.name}),
    }
    space, report = data.fit(config.fit, config.label, metadata)
    return space, report, data
