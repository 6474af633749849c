"""Prompt templates of the judge models: named fields filled in, every other brace kept as written.

A judge template is the user message a judge model reads, with fields such
as `{query}` and `{response}` where the texts go. The rule, one for every
judge: each field is replaced by its text in one pass (a text that itself
holds `{response}` is not filled again), and every other brace stays as
written, so a template may show JSON (`{"verdict": "safe"}`) without
escaping. A field written with an attribute, index, conversion or format
(`{query.upper}`, `{response[0]}`, `{query!r}`, `{query:>9}`) is refused,
since it would look like Python's `str.format` and not behave like it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

from dro_jax.common.errors import DroJaxError


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
    """A template `text` with the `fields` it must contain; checked (and rendered once) when made."""

    text: str
    fields: tuple[str, ...]
    what: str = "a judge template"

    def __post_init__(self) -> None:
        names = "|".join(map(re.escape, self.fields))
        lookup = re.search(r"\{(?:" + names + r")[.\[!:][^{}]*\}", self.text)
        if lookup:
            raise DroJaxError(
                f"{self.what} may hold only the plain fields {', '.join(self.placeholders)}, not {lookup.group(0)!r} "
                "(other braces are kept as written)"
            )
        missing = [p for p in self.placeholders if p not in self.text]
        if missing:
            raise DroJaxError(f"{self.what} must contain {', '.join(self.placeholders)}; it lacks {', '.join(missing)}")
        self.render({name: f"<{name}>" for name in self.fields})

    @property
    def placeholders(self) -> list[str]:
        return ["{" + name + "}" for name in self.fields]

    def render(self, values: Mapping[str, str]) -> str:
        """The template with each field replaced by `values[field]`."""
        pattern = re.compile(r"\{(" + "|".join(map(re.escape, self.fields)) + r")\}")
        return pattern.sub(lambda match: values[match.group(1)], self.text)
