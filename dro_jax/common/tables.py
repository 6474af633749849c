"""Result tables as text: markdown for reading, csv for spreadsheets."""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A pipe table; cell text is kept on one line and its pipes escaped, so an error message cannot break it."""
    def cell(text: str) -> str:
        return " ".join(str(text).replace("|", "\\|").split())

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def dataclass_csv(rows: Sequence, row_type: type) -> str:
    """One csv line per dataclass instance, with a header of the field names."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in dataclasses.fields(row_type)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(dataclasses.asdict(r) for r in rows)
    return buffer.getvalue()
