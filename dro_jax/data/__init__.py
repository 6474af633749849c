"""The project's own query sets, written for dro-jax.

Harmful and harmless queries come in minimal pairs: line i of
`harmful_<split>` and line i of `harmless_<split>` share a verb or topic and
differ in intent. The train split (100 + 100) anchors the representation space
and trains prompts; the test split (25 + 25) is held out for evaluation.
`helpful_instructions` holds everyday instructions (cooking, writing, maths,
code, travel, explanations) that any prompt should leave answerable, for the
helpfulness evaluation.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

QUERY_SETS = ("harmful_train", "harmless_train", "harmful_val", "harmless_val", "harmful_test", "harmless_test", "helpful_instructions")


def query_set_path(name: str) -> Path:
    """Path of a packaged query set (one query per line)."""
    if name not in QUERY_SETS:
        raise KeyError(name)
    return Path(str(resources.files(__name__) / "queries" / f"{name}.txt"))
