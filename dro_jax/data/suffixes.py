"""Adversarial suffixes: text appended to each query, as suffix jailbreaks (GCG and the like) attack a model.

An evaluation under a suffix generates from, and scores the refusal log-odds
of, query + suffix, while every judge still sees the original query: the
suffix is the attack, not part of what was asked. A suffix file is read by
`QuerySuffix.read`, in one of these forms:

- `.json`: a string (one suffix for every query), a list of strings (one per
  query, item i for query i), or an object {"suffix": ...} holding either;
- `.txt`: a file with one non-blank line is one suffix for every query; with
  several, line i (blank lines skipped, as in query files) is query i's
  suffix. A suffix that spans lines needs the JSON form.

A suffix is joined to its query by one space, unless it starts with
whitespace (e.g. a line break), when it is appended as it is.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Mapping, Sequence

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path

SUFFIX_KEY = "suffix"


def append_suffix(query: str, suffix: str) -> str:
    """The query with its suffix, as the model reads it (see the module docstring for the joining rule)."""
    return query + suffix if suffix[:1].isspace() else f"{query} {suffix}"


@dataclasses.dataclass(frozen=True)
class QuerySuffix:
    """One suffix for every query (`per_query` False, one text) or one per query (in query order).

    `name` (the file's stem) marks result rows measured under the suffix.
    """

    name: str
    texts: tuple[str, ...]
    per_query: bool

    def __post_init__(self) -> None:
        if not self.texts:
            raise DroJaxError(f"{self.name}: no suffixes")
        if not self.per_query and len(self.texts) != 1:
            raise DroJaxError(f"{self.name}: one suffix for every query, got {len(self.texts)}")
        for number, text in enumerate(self.texts, start=1):
            if not isinstance(text, str) or not text.strip():
                which = f"suffix {number}" if self.per_query else "the suffix"
                raise DroJaxError(f"{self.name}: {which} is not a non-empty string")

    @classmethod
    def read(cls, path: str | Path) -> "QuerySuffix":
        """A suffix file in one of the forms of the module docstring."""
        path = as_path(path)
        if not path.is_file():
            raise DroJaxError(f"{path}: no such suffix file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DroJaxError(f"{path}: the suffix file is not valid UTF-8") from None
        suffix = path.suffix.lower()
        if suffix == ".json":
            return cls._from_json(path, text)
        if suffix == ".txt":
            lines = [line for line in text.splitlines() if line.strip()]
            if not lines:
                raise DroJaxError(f"{path}: the suffix file is empty")
            return cls(path.stem, tuple(lines), per_query=len(lines) > 1)
        raise DroJaxError(f"{path}: a suffix file is .json or .txt")

    @classmethod
    def _from_json(cls, path: Path, text: str) -> "QuerySuffix":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DroJaxError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
        if isinstance(data, dict):
            if set(data) != {SUFFIX_KEY}:
                raise DroJaxError(f"{path}: a JSON object holds exactly one key, {SUFFIX_KEY!r}; got {', '.join(map(repr, data)) or 'none'}")
            data = data[SUFFIX_KEY]
        if isinstance(data, str):
            return cls(path.stem, (data,), per_query=False)
        if isinstance(data, list):
            if not data:
                raise DroJaxError(f"{path}: the list of suffixes is empty")
            return cls(path.stem, tuple(data), per_query=True)
        raise DroJaxError(f"{path}: expected a string, a list of strings (one per query) or {{{SUFFIX_KEY!r}: ...}}")

    def for_queries(self, count: int, source: str) -> list[str]:
        """The suffix of each of `count` queries of the set `source`; a per-query file must have `count` of them."""
        if not self.per_query:
            return list(self.texts) * count
        if len(self.texts) != count:
            raise DroJaxError(
                f"{self.name}: {len(self.texts)} suffixes, one per query, but {source} has {count} queries "
                "(give as many suffixes as queries, or one suffix for every query)"
            )
        return list(self.texts)

    def per_set(self, datasets: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
        """Each query set's suffixes, checked for every set before any work starts."""
        return {name: self.for_queries(len(queries), name) for name, queries in datasets.items()}

    def label(self, setting: str) -> str:
        """How a result row names a prompt setting measured under this suffix."""
        return f"{setting} + suffix {self.name}"
