"""Evaluating prompt settings on query sets: refusals, refusal log-odds, movement along the refusal direction
(counted as `dro_jax.evaluation.measure` says, the string judge's compliance beside the judge model's on harmful
sets), and reply quality beside them (reply drift, reply surprise and degenerate replies, see
`dro_jax.evaluation.quality`). `SetMeasurer` is the engine: `evaluate_settings` runs it over whole sets on one
model, the sweep (`dro_jax.evaluation.sweep`) over several models and over process shares of each set; both give
`dro_jax.evaluation.rows.EvalRow`s."""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping, Sequence

import numpy as np

from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.errors import DroJaxError
from dro_jax.data.suffixes import QuerySuffix
from dro_jax.evaluation.measure import Measurement, harmful_set_flags, measure_reference, measure_setting, reference_decoding
from dro_jax.evaluation.quality import DegenerationRule, ReplyReference
from dro_jax.evaluation.rows import EvalRow
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.likelihood import reply_nll
from dro_jax.inference.refusal_score import Openings
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import NO_PROMPT, PromptSetting
from dro_jax.judging.judges import RefusalJudge, SafetyJudge
from dro_jax.judging.responses import Measuring, Response, keep_longest
from dro_jax.loading import LoadedModel

GREEDY = SamplingConfig(max_new_tokens=64)


@dataclasses.dataclass(frozen=True, eq=False)
class SettingOutcome:
    """Per-query results of one setting on one set; `coords` [n, k] are anchor-space coordinates (None without
    one); `reply_nll` [n, 2] the NLL per token of the set's reference replies under this setting (whole, opening)."""

    setting: str
    dataset: str
    log_odds: np.ndarray
    coords: np.ndarray | None
    responses: list[Response]
    reply_nll: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class EvalConfig:
    """How prompt settings are evaluated.

    sampling: the decoding of every query set, or, as a mapping, of each set
    by its name (the reference gives harmful and harmless queries different
    lengths); `num_samples` replies per query drawn with `seed`, of which the
    `longest` (by words; None: all) count; `judge`: the string judge (None:
    the packaged one); `openings`: the scored reply openings; `degeneration`:
    what counts as a broken reply; `harmful_sets`: the set names a judge
    model judges too; `suffix`: with one, every setting (and the reference
    replies) reads query + suffix, judges see the original query, and rows
    name the setting with the suffix (`QuerySuffix.label`).
    """

    sampling: SamplingConfig | Mapping[str, SamplingConfig] = GREEDY
    num_samples: int = 1
    longest: int | None = None
    seed: int = 0
    judge: RefusalJudge | None = None
    openings: Openings = Openings()
    degeneration: DegenerationRule = DegenerationRule()
    harmful_sets: Collection[str] = ()
    suffix: QuerySuffix | None = None

    @property
    def measuring(self) -> Measuring:
        return Measuring(self.num_samples, self.seed, self.judge, self.openings)

    def label(self, setting: PromptSetting) -> str:
        """The name rows give the setting: its own, with the suffix's when there is one."""
        return setting.name if self.suffix is None else self.suffix.label(setting.name)


class SetMeasurer:
    """One query set (or one process's share of it) measured under one setting after another, as `config` says.

    Its reply reference is measured once here, or given (e.g. a run's, to add settings to it); when the evaluation
    decodes as the reference does (greedy, one reply per query), the reference's own measurement is the `none`
    setting's and is reused. `query_numbers`: the share's queries' numbers in the whole set (see
    `generate_responses`); `judge_model` is given for a harmful set only.
    """

    def __init__(
        self, model: LoadedModel, plain: EncodedQueries, decoding: SamplingConfig, config: EvalConfig, batching: Batching,
        query_numbers: Sequence[int] | None = None, judge_model: SafetyJudge | None = None, reference: ReplyReference | None = None,
    ) -> None:
        self.model, self.plain, self.decoding, self.config, self.batching = model, plain, decoding, config, batching
        self.query_numbers, self.judge_model = query_numbers, judge_model
        self.reused = None
        if reference is None:
            reference, greedy = measure_reference(
                model, plain, decoding.max_new_tokens, config.measuring, batching, query_numbers, judge_model
            )
            if decoding == reference_decoding(decoding.max_new_tokens) and config.num_samples == 1:
                self.reused = greedy
        self.reference = reference

    def measure(self, encoded: EncodedQueries | None) -> tuple[Measurement, np.ndarray]:
        """The measurement of the queries `encoded` with a setting (None: without a prompt) and [n] the NLL per
        token under no prompt of each query's first reply (for the reply surprise)."""
        if encoded is None and self.reused is not None:
            # The reference replies are no prompt's own greedy replies: their NLL under no prompt is the surprise's zero.
            return self.reused, self.reference.nll[:, 0]
        measured = measure_setting(
            self.model, self.plain if encoded is None else encoded, self.decoding, self.config.measuring, self.batching,
            self.query_numbers, self.reference.token_ids, self.judge_model,
        )
        return measured, own_reply_nll(self.model, self.plain, measured.responses, self.batching)


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluation:
    rows: list[EvalRow]
    outcomes: list[SettingOutcome]
    references: dict[str, ReplyReference]  # per dataset: the replies reply drift was measured on


def evaluate_settings(
    model: LoadedModel,
    datasets: dict[str, Sequence[str]],
    settings: Sequence[PromptSetting],
    config: EvalConfig = EvalConfig(),
    anchors: AnchorSpace | None = None,
    references: Mapping[str, ReplyReference] | None = None,
    judge_model: SafetyJudge | None = None,
    batching: Batching = Batching(),
) -> Evaluation:
    """Every setting on every dataset, as `config` says: responses judged for refusal, refusal log-odds, probe
    logits (with `anchors`), reply drift and degenerate responses, batched as `batching` says. On the datasets
    `config` names harmful, `judge_model` (when given) judges every response too.

    Reply drift is measured on `references[dataset]` when given (e.g. a run's,
    to add settings to it), else on the greedy replies with no prompt, which
    are generated here (once: a greedy evaluation of `none` reuses them).
    """
    if config.longest is not None and not 1 <= config.longest <= config.num_samples:
        raise DroJaxError(f"cannot keep the {config.longest} longest of {config.num_samples} responses per query")
    suffixes = {} if config.suffix is None else config.suffix.per_set(datasets)
    # Settings without a soft prompt carry an unused one shaped like the first soft prompt's, so that every setting
    # runs the same compiled programs (their shared prefixes are padded alike, see `padded_prefix`).
    soft = next((setting.soft_prompt for setting in settings if setting.soft_prompt is not None), None)

    def encode(queries: Sequence[str], setting: PromptSetting, name: str) -> EncodedQueries:
        encoded = encode_queries(model, queries, setting, name, suffixes.get(name))
        return encoded if soft is None else encoded.with_unused_soft_prompt(soft)

    harmful = harmful_set_flags(list(datasets), config.harmful_sets, None if judge_model is None else judge_model.name)
    rows, outcomes, used = [], [], {}
    for name, queries in datasets.items():
        measurer = SetMeasurer(
            model, encode(queries, NO_PROMPT, name), _decoding_of(config.sampling, name), config, batching,
            judge_model=judge_model if harmful[name] else None,  # the judge model judges harmful sets only
            reference=(references or {}).get(name),
        )
        used[name] = measurer.reference
        baseline = None
        for setting in settings:
            measured, own = measurer.measure(None if setting.is_empty else encode(queries, setting, name))
            responses = keep_longest(measured.responses, config.longest)
            scores = measured.scores
            coords = logit = shift = None
            if anchors is not None:
                coords = anchors.leading(scores.states)
                logit = float(np.mean(anchors.refusal.logits(coords)))
                if setting.name == NO_PROMPT:
                    baseline = logit
                shift = None if baseline is None else logit - baseline
            label = config.label(setting)
            rows.append(EvalRow.measured(
                label, name, len(queries), responses, scores.log_odds, measurer.reference.drift(measured.reference_nll),
                config.degeneration, compliance_logit=logit, compliance_shift=shift, reply_surprise=measurer.reference.surprise(own),
            ))
            outcomes.append(SettingOutcome(label, name, scores.log_odds, coords, responses, measured.reference_nll))
    return Evaluation(rows, outcomes, used)


def own_reply_nll(
    model: LoadedModel, plain: EncodedQueries, responses: Sequence[Response], batching: Batching
) -> np.ndarray:
    """[n] NLL per token under no prompt (`plain`, the queries encoded without one) of each query's first reply."""
    first = {}
    for response in responses:
        first.setdefault(response.query_index, response.token_ids)
    return reply_nll(model, plain, [first[i] for i in range(len(plain))], batching)[:, 0]


def _decoding_of(sampling: SamplingConfig | Mapping[str, SamplingConfig], dataset: str) -> SamplingConfig:
    """The decoding of `dataset`: the one given for all, or its own; a set without one is an error, not a default."""
    if isinstance(sampling, SamplingConfig):
        return sampling
    if dataset not in sampling:
        raise DroJaxError(f"no decoding given for the query set {dataset!r} (given: {', '.join(sampling)})")
    return sampling[dataset]
