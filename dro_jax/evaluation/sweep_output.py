"""Sweep results as files: sweep.csv and sweep.md (one row per model x prompt x dataset) and sweep.json."""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import check_writable
from dro_jax.common.paths import AnyPath, PathLike, as_path
from dro_jax.common.tables import markdown_table, write_tables
from dro_jax.evaluation.measure import judge_note
from dro_jax.evaluation.sweep import SweepRow

FILE_NAMES = ("sweep.md", "sweep.csv", "sweep.json")


def prepare_output_dir(directory: PathLike, names: Sequence[str] = FILE_NAMES) -> AnyPath:
    """Creates the directory if needed and checks that the files `names` (default: the sweep's three) can be
    written, before any work."""
    directory = as_path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DroJaxError(f"{directory}: cannot create the output directory ({err.strerror or err})") from None
    for name in names:
        check_writable(directory / name)
    return directory


def _count(count: int | None, rate: float | None) -> str:
    return "" if count is None else f"{count} ({rate:.1%})"


def sweep_markdown(rows: Sequence[SweepRow], judge_model: str | None = None, harmful_datasets: Collection[str] = ()) -> str:
    """A table with counts and their rates, and under it what the judged-compliance column holds (n/a without
    `judge_model` and on harmless sets); error rows have empty numbers and the error text."""
    header = ["model", "prompt", "dataset", "queries", "responses", "queries declined", "apology-only responses", "refused responses",
              "queries with any refusal", "queries with any compliance", "queries with any judged compliance", "mean refusal log-odds",
              "reply drift (nats/token)", "drift, first 8 tokens", "degenerate responses", "error"]
    table = markdown_table(header, [
        [
            row.model, row.prompt, row.dataset, str(row.num_queries),
            "" if row.num_responses is None else str(row.num_responses),
            _count(row.queries_any_decline, row.any_decline_rate),
            "" if row.apology_responses is None else str(row.apology_responses),
            _count(row.refused_responses, row.response_refusal_rate),
            _count(row.queries_any_refusal, row.any_refusal_rate),
            _count(row.queries_any_compliance, row.any_compliance_rate),
            _judged(row),
            "" if row.mean_refusal_log_odds is None else f"{row.mean_refusal_log_odds:+.3f}",
            "" if row.reply_drift is None else f"{row.reply_drift:+.3f}",
            "" if row.reply_drift_opening is None else f"{row.reply_drift_opening:+.3f}",
            _count(row.degenerate_responses, row.degenerate_rate),
            row.error or "",
        ]
        for row in rows
    ])
    return f"{table}\n\n{judge_note(judge_model, harmful_datasets)}"


def _judged(row: SweepRow) -> str:
    """The judged-compliance cell: empty in an error row, n/a where no judge model judged."""
    if row.error is not None:
        return ""
    return "n/a" if row.queries_any_harmful_compliance is None else _count(row.queries_any_harmful_compliance, row.any_harmful_compliance_rate)


def write_sweep(
    rows: Sequence[SweepRow], directory: Path, judge_model: str | None = None, harmful_datasets: Collection[str] = ()
) -> list[Path]:
    """Writes the three files atomically (`judge_model`, `harmful_datasets`: see `sweep_markdown`); returns their paths."""
    return write_tables(directory / "sweep", rows, SweepRow, sweep_markdown(rows, judge_model, harmful_datasets))
