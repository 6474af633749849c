"""Result tables as text (markdown for reading, csv for spreadsheets) and as the three files every results table
of the project is written to."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any, Sequence

from dro_jax.common.files import write_text


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


def write_tables(stem: Path, rows: Sequence, row_type: type, markdown: str, summary: Any = None) -> list[Path]:
    """STEM.md (`markdown`), STEM.csv (one line per row) and STEM.json (the rows, or `summary` when given: a record
    that holds them with more), each written atomically; returns their paths."""
    md_path, csv_path, json_path = (stem.with_suffix(suffix) for suffix in (".md", ".csv", ".json"))
    records = [dataclasses.asdict(row) for row in rows] if summary is None else summary
    write_text(md_path, markdown.rstrip("\n") + "\n")
    write_text(csv_path, dataclass_csv(rows, row_type))
    write_text(json_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    return [md_path, csv_path, json_path]
