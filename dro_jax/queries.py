"""Reading query sets: the packaged ones by name, or user files (txt, csv, jsonl)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Sequence

from dro_jax.data import QUERY_SETS, query_set_path
from dro_jax.errors import DroJaxError

DEFAULT_FIELD = "query"


def check_query_sets(harmful: Sequence[str], harmless: Sequence[str]) -> None:
    """The paired harmful / harmless sets that anchoring and training need: both non-empty, the same size."""
    if not harmful or not harmless:
        raise DroJaxError(f"training needs harmful and harmless queries; got {len(harmful)} harmful and {len(harmless)} harmless")
    if len(harmful) != len(harmless):
        raise DroJaxError(
            f"the harmful and harmless sets must be the same size (they are minimal pairs); got {len(harmful)} and {len(harmless)}"
        )


def read_queries(spec: str | Path, field: str | None = None) -> list[str]:
    """Queries from a packaged set name (e.g. `harmful_test`) or a file.

    `.txt`: one query per line, blank lines skipped. `.csv`: the column
    `field` (default "query") of a file with a header row. `.jsonl`: the
    string `field` (default "query") of one JSON object per line.
    """
    if str(spec) in QUERY_SETS:
        return read_queries(query_set_path(str(spec)))
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(QUERY_SETS)
        raise DroJaxError(f"{path}: no such query file (packaged sets: {names})")
    text = _read_utf8(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        queries = _from_csv(path, text, field or DEFAULT_FIELD)
    elif suffix == ".jsonl":
        queries = _from_jsonl(path, text, field or DEFAULT_FIELD)
    else:
        if field is not None:
            raise DroJaxError(f"{path}: a field name only applies to .csv and .jsonl files")
        queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise DroJaxError(f"{path}: the query file is empty")
    return queries


def _read_utf8(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DroJaxError(f"{path}: line {line} is not valid UTF-8") from None


def _from_csv(path: Path, text: str, column: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        return []
    if column not in reader.fieldnames:
        raise DroJaxError(f"{path}: no column {column!r}; the columns are {', '.join(reader.fieldnames)}")
    return [row[column].strip() for row in reader if (row.get(column) or "").strip()]


def _from_jsonl(path: Path, text: str, field: str) -> list[str]:
    queries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DroJaxError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or field not in record:
            raise DroJaxError(f"{path}: line {number} has no field {field!r}")
        if not isinstance(record[field], str):
            raise DroJaxError(f"{path}: line {number}: field {field!r} is not a string")
        if record[field].strip():
            queries.append(record[field].strip())
    return queries
