"""Evaluating prompt settings on held-out query sets: refusals, refusal log-odds, movement along the refusal
direction (counted as `dro_jax.evaluation.measure` says, the string judge's compliance beside the judge
model's on harmful sets), and reply quality beside them (reply drift and degenerate replies, see
`dro_jax.evaluation.quality`)."""

from __future__ import annotations

import dataclasses
from typing import Collection, Mapping, Sequence

import numpy as np

from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.errors import DroJaxError
from dro_jax.common.tables import markdown_table
from dro_jax.data.suffixes import QuerySuffix
from dro_jax.evaluation.measure import (
    count_declines, count_harmful_compliance, count_refusals, harmful_set_flags, measure_reference, measure_setting, reference_decoding,
)
from dro_jax.evaluation.quality import DegenerationCounts, DegenerationRule, ReplyReference
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.judges import RefusalJudge, SafetyJudge
from dro_jax.inference.likelihood import reply_nll
from dro_jax.inference.refusal_score import Openings
from dro_jax.inference.respond import Measuring, Response, keep_longest
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import NO_PROMPT, PromptSetting
from dro_jax.loading import LoadedModel

GREEDY = SamplingConfig(max_new_tokens=64)


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One prompt setting on one query set.

    compliance_logit: mean refusal-probe logit of the representations (higher:
    further towards compliance); compliance_shift: its change against no
    prompt on the same set (negative: moved towards refusal). None without an
    anchor space (or, for the shift, without the `none` setting).
    reply_drift: NLL per token of the set's reference replies (greedy, no
    prompt) under this setting minus under no prompt, nats, over the whole
    replies and (reply_drift_opening) over their first 8 tokens;
    reply_surprise: NLL per token under no prompt of this setting's own
    replies (the first per query) minus that of no prompt's own replies;
    degenerate, looping, shouting: responses that loop or shout
    (`DegenerationRule`). declined_responses, queries_any_decline,
    apology_responses: the decline judge's counts (`Response.kind`), beside
    the configured string judge's refusal counts.
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
    reply_drift: float | None = None
    degenerate_responses: int | None = None
    looping_responses: int | None = None
    shouting_responses: int | None = None
    harmful_compliant_responses: int | None = None
    queries_any_harmful_compliance: int | None = None
    declined_responses: int | None = None
    queries_any_decline: int | None = None
    apology_responses: int | None = None
    reply_drift_opening: float | None = None
    reply_surprise: float | None = None


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
        decoding = _decoding_of(config.sampling, name)
        set_judge = judge_model if harmful[name] else None  # the judge model judges harmful sets only
        baseline = None
        reference = (references or {}).get(name)
        reused = None  # the set's greedy measurement without a prompt, when the evaluation is greedy
        plain = encode(queries, NO_PROMPT, name)  # encoded once
        if reference is None:
            reference, greedy = measure_reference(
                model, plain, decoding.max_new_tokens, config.measuring, batching, judge_model=set_judge
            )
            reused = greedy if decoding == reference_decoding(decoding.max_new_tokens) and config.num_samples == 1 else None
        used[name] = reference
        for setting in settings:
            if setting.is_empty and reused is not None:
                measured = reused
            else:
                encoded = plain if setting.is_empty else encode(queries, setting, name)
                measured = measure_setting(
                    model, encoded, decoding, config.measuring, batching, reference_replies=reference.token_ids, judge_model=set_judge,
                )
            responses = keep_longest(measured.responses, config.longest)
            scores = measured.scores
            coords = logit = shift = None
            if anchors is not None:
                coords = anchors.leading(scores.states)
                logit = float(np.mean(anchors.refusal.logits(coords)))
                if setting.name == NO_PROMPT:
                    baseline = logit
                shift = None if baseline is None else logit - baseline
            refused, any_refusal, any_compliance = count_refusals(responses, len(queries))
            judged, any_judged = count_harmful_compliance(responses, len(queries))
            declined, any_decline, apologies = count_declines(responses, len(queries))
            broken = DegenerationCounts.of(responses, config.degeneration)
            drift = reference.drift(measured.reference_nll)
            # The reference replies are no prompt's own greedy replies: their NLL under no prompt is the surprise's zero.
            own = reference.nll[:, 0] if measured is reused else own_reply_nll(model, plain, measured.responses, batching)
            surprise = float(np.nanmean(own) - np.nanmean(reference.nll[:, 0]))
            label = setting.name if config.suffix is None else config.suffix.label(setting.name)
            rows.append(EvalRow(
                label, name, len(queries), len(responses), refused, any_refusal, any_compliance,
                float(np.mean(scores.log_odds)), logit, shift, drift.whole,
                broken.degenerate, broken.looping, broken.shouting, judged, any_judged,
                declined, any_decline, apologies, drift.opening, surprise,
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


def results_markdown(rows: Sequence[EvalRow]) -> str:
    """Two tables, one row per (setting, dataset) each: refusals (the decline judge's counts first, then the
    configured string judge's and, where a judge model judged, the paper's judged compliance; n/a elsewhere, say
    why with `judge_note`) and reply quality."""
    def number(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    def share(count, total):
        return "n/a" if count is None else f"{count}/{total}"

    refusals = ["setting", "queries", "declined", "apology only", "refused (string judge)", "complied (string judge)",
                "judged compliant responses", "queries with any judged compliance", "mean refusal log-odds"]
    quality = ["setting", "queries", "reply drift (nats/token)", "drift, first 8 tokens", "reply surprise (nats/token)",
               "degenerate (loop / shout)", "compliance logit", "shift vs none"]
    return markdown_table(refusals, [
        [
            row.setting, f"{row.dataset} ({row.num_queries})", share(row.queries_any_decline, row.num_queries),
            share(row.apology_responses, row.num_responses), f"{row.queries_any_refusal}/{row.num_queries}",
            f"{row.queries_any_compliance}/{row.num_queries}", share(row.harmful_compliant_responses, row.num_responses),
            share(row.queries_any_harmful_compliance, row.num_queries), f"{row.mean_refusal_log_odds:+.2f}",
        ]
        for row in rows
    ]) + "\n\n" + markdown_table(quality, [
        [
            row.setting, f"{row.dataset} ({row.num_queries})", number(row.reply_drift, "+.3f"), number(row.reply_drift_opening, "+.3f"),
            number(row.reply_surprise, "+.3f"), degenerate_cell(row), number(row.compliance_logit, "+.3f"), number(row.compliance_shift, "+.3f"),
        ]
        for row in rows
    ])


def degenerate_cell(row: EvalRow) -> str:
    """"3/25 (2 / 1)": degenerate responses of all, and how many loop and how many shout."""
    if row.degenerate_responses is None:
        return "n/a"
    return DegenerationCounts(row.degenerate_responses, row.looping_responses, row.shouting_responses).cell(row.num_responses)
