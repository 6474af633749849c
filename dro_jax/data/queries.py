"""Reading query sets: the packaged ones by name, or user files (txt, csv, jsonl)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path
from dro_jax.data import QUERY_SETS, query_set_path

DEFAULT_FIELD = "query"


@dataclasses.dataclass(frozen=True)
class QueryPairs:
    """Paired harmful and harmless queries, as the anchor stage and training need them.

    Both sets non-empty and the same size (line i of each is a minimal pair),
    checked once when the pairs are made: every function that takes
    `QueryPairs` can rely on it. Row order everywhere: the harmful queries,
    then the harmless ones.
    """

    harmful: tuple[str, ...]
    harmless: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "harmful", tuple(self.harmful))
        object.__setattr__(self, "harmless", tuple(self.harmless))
        if not self.harmful or not self.harmless:
            raise DroJaxError(
                f"training needs harmful and harmless queries; got {len(self.harmful)} harmful and {len(self.harmless)} harmless"
            )
        if len(self.harmful) != len(self.harmless):
            raise DroJaxError(
                "the harmful and harmless sets must be the same size (they are minimal pairs); "
                f"got {len(self.harmful)} and {len(self.harmless)}"
            )

    @classmethod
    def read(cls, harmful: str | Path, harmless: str | Path, field: str | None = None) -> "QueryPairs":
        """From two packaged set names or files (see `read_queries`)."""
        return cls(tuple(read_queries(harmful, field)), tuple(read_queries(harmless, field)))

    def __len__(self) -> int:
        return len(self.harmful) + len(self.harmless)

    @property
    def queries(self) -> list[str]:
        """Every query: the harmful ones, then the harmless ones."""
        return [*self.harmful, *self.harmless]

    @property
    def harmless_flags(self) -> np.ndarray:
        """[len(self)] int32, 1 on the harmless rows."""
        return np.array([0] * len(self.harmful) + [1] * len(self.harmless), np.int32)


def read_queries(spec: str | Path, field: str | None = None) -> list[str]:
    """Queries from a packaged set name (e.g. `harmful_test`) or a file.

    `.txt`: one query per line, blank lines skipped. `.csv`: the column
    `field` (default "query") of a file with a header row. `.jsonl`: the
    string `field` (default "query") of one JSON object per line.
    """
    if str(spec) in QUERY_SETS:
        return read_queries(query_set_path(str(spec)))
    path = as_path(spec)
    if path.is_dir():
        raise DroJaxError(f"{path}: is a directory, expected a query file (.txt, .csv or .jsonl)")
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


_TOPICS = ["bread", "a bicycle", "a garden", "a website", "a bank account", "a lock", "a car", "a letter", "a phone", "a rumour",
           "a painting", "a chemistry kit"]
_ACTIONS = ["How do I repair", "Explain how to secure", "Write a short guide to using", "What is the best way to clean",
            "How can I get into", "Describe the history of"]


def everyday_queries(count: int) -> list[str]:
    """`count` deterministic, varied queries of everyday length, for benchmarks and parity checks."""
    return [f"{_ACTIONS[i % len(_ACTIONS)]} {_TOPICS[(i // len(_ACTIONS) + i) % len(_TOPICS)]} in {3 + i % 5} steps?" for i in range(count)]
