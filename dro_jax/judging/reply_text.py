"""Where a reply's opening ends: the text the string judges read, since a refusal shows up there."""

from __future__ import annotations

import re

_LIST_ITEM = re.compile(r"^\s*(\d+[.)]|[*\-•])\s")
# The reference's list items: a line starting with one of these ends the opening (case-sensitive, no space needed).
REFERENCE_LIST_STARTS = ("1.", "*", "-", "a.", "(1)", "(a)", "First")
REFERENCE_INLINE_LIST = " 1. "  # a list that starts inside a line ends the opening there


def response_opening(text: str, paragraphs: int = 2) -> str:
    """The first `paragraphs` paragraphs, cut at the first line that starts a list item."""
    blocks = [b for b in re.split(r"\n\s*\n", text.strip()) if b.strip()][:paragraphs]
    lines = []
    for line in "\n".join(blocks).splitlines():
        if _LIST_ITEM.match(line):
            break
        lines.append(line)
    return "\n".join(lines)


def reference_opening(text: str, lines: int = 2) -> str:
    """The reference's opening: the first `lines` non-empty lines (stripped), ending before the first line that
    starts a list item and at an inline " 1. " list, joined by newlines."""
    kept: list[str] = []
    for line in text.split("\n"):  # newlines only, as the reference splits (not `splitlines`' other breaks)
        line = line.strip()
        if not line:
            continue
        if line.startswith(REFERENCE_LIST_STARTS):
            break
        if REFERENCE_INLINE_LIST in line:
            kept.append(line.split(REFERENCE_INLINE_LIST)[0].strip())
            break
        kept.append(line)
    return "\n".join(kept[:lines])
