"""Reading query files."""

from __future__ import annotations

from pathlib import Path

from dro_jax.errors import DroJaxError


def read_queries(path: str | Path) -> list[str]:
    """One query per line of a UTF-8 text file; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DroJaxError(f"{path}: no such query file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DroJaxError(f"{path}: line {line} is not valid UTF-8") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise DroJaxError(f"{path}: the query file is empty")
    return queries
