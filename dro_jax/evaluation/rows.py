"""The one row type of every evaluation (`evaluate`, `run`, `sweep`, the experiments): a prompt setting on a query
set, counted from its judged responses as `dro_jax.evaluation.measure` says, and the tables that show rows."""

from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

import numpy as np

from dro_jax.common.tables import markdown_table
from dro_jax.evaluation.measure import count_declines, count_harmful_compliance, count_refusals, judge_note
from dro_jax.evaluation.quality import DegenerationCounts, DegenerationRule, Drift
from dro_jax.judging.responses import Response


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One prompt setting on one query set (in a sweep: of one `model`); in an error row (a sweep's model that did
    not load, a prompt that did not fit) only `num_queries` and `error` are set.

    Counts: responses the configured string judge calls refusals, and queries
    with any refusal (the harmless-set metric) or any compliant response (the
    harmful-set metric); declined_responses, queries_any_decline,
    apology_responses: the decline judge's (`Response.kind`), the headline
    refusals; harmful_compliant_responses, queries_any_harmful_compliance: the
    paper's rule with a judge model, None without one and on harmless sets.
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
    (`DegenerationRule`).
    """

    setting: str
    dataset: str
    num_queries: int
    num_responses: int | None = None
    refused_responses: int | None = None
    queries_any_refusal: int | None = None
    queries_any_compliance: int | None = None
    mean_refusal_log_odds: float | None = None
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
    model: str | None = None
    error: str | None = None

    @classmethod
    def measured(
        cls, setting: str, dataset: str, num_queries: int, responses: Sequence[Response], log_odds: np.ndarray, drift: Drift,
        rule: DegenerationRule = DegenerationRule(), **more,
    ) -> "EvalRow":
        """The row of these judged responses (query indices in the set) and per-query refusal log-odds; `more`: the
        fields that come from elsewhere (the probe's, the reply surprise, the model)."""
        refused, any_refusal, any_compliance = count_refusals(responses, num_queries)
        judged, any_judged = count_harmful_compliance(responses, num_queries)
        declined, any_decline, apologies = count_declines(responses, num_queries)
        broken = DegenerationCounts.of(responses, rule)
        return cls(
            setting, dataset, num_queries, len(responses), refused, any_refusal, any_compliance, float(np.mean(log_odds)),
            reply_drift=drift.whole, reply_drift_opening=drift.opening, degenerate_responses=broken.degenerate,
            looping_responses=broken.looping, shouting_responses=broken.shouting, harmful_compliant_responses=judged,
            queries_any_harmful_compliance=any_judged, declined_responses=declined, queries_any_decline=any_decline,
            apology_responses=apologies, **more,
        )


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


def sweep_markdown(rows: Sequence[EvalRow], judge_model: str | None = None, harmful_datasets: Collection[str] = ()) -> str:
    """One table for rows of several models, with counts and their rates, and under it what the judged-compliance
    column holds (n/a without `judge_model` and on harmless sets); error rows have empty numbers and the error text."""
    def count(value: int | None, total: int | None) -> str:
        return "" if value is None else f"{value} ({value / total:.1%})"

    def number(value: float | None) -> str:
        return "" if value is None else f"{value:+.3f}"

    def judged(row: EvalRow) -> str:
        if row.error is not None:
            return ""
        return "n/a" if row.queries_any_harmful_compliance is None else count(row.queries_any_harmful_compliance, row.num_queries)

    header = ["model", "prompt", "dataset", "queries", "responses", "queries declined", "apology-only responses", "refused responses",
              "queries with any refusal", "queries with any compliance", "queries with any judged compliance", "mean refusal log-odds",
              "reply drift (nats/token)", "drift, first 8 tokens", "reply surprise (nats/token)", "degenerate responses", "error"]
    table = markdown_table(header, [
        [
            row.model, row.setting, row.dataset, str(row.num_queries), "" if row.num_responses is None else str(row.num_responses),
            count(row.queries_any_decline, row.num_queries), "" if row.apology_responses is None else str(row.apology_responses),
            count(row.refused_responses, row.num_responses), count(row.queries_any_refusal, row.num_queries),
            count(row.queries_any_compliance, row.num_queries), judged(row), number(row.mean_refusal_log_odds),
            number(row.reply_drift), number(row.reply_drift_opening), number(row.reply_surprise),
            count(row.degenerate_responses, row.num_responses), row.error or "",
        ]
        for row in rows
    ])
    return f"{table}\n\n{judge_note(judge_model, harmful_datasets)}"
