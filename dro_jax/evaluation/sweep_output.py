"""Sweep results as files: sweep.csv and sweep.md (one row per model x prompt x dataset, see `sweep_markdown`) and sweep.json."""

from __future__ import annotations

from pathlib import Path
from typing import Collection, Sequence

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import check_writable
from dro_jax.common.paths import AnyPath, PathLike, as_path
from dro_jax.common.tables import write_tables
from dro_jax.evaluation.rows import EvalRow, sweep_markdown

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


def write_sweep(
    rows: Sequence[EvalRow], directory: Path, judge_model: str | None = None, harmful_datasets: Collection[str] = ()
) -> list[Path]:
    """Writes the three files atomically (`judge_model`, `harmful_datasets`: see `sweep_markdown`); returns their paths."""
    return write_tables(directory / "sweep", rows, EvalRow, sweep_markdown(rows, judge_model, harmful_datasets))
