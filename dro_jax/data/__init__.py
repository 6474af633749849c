"""The project's own query sets, written for dro-jax.

`harmful_train` / `harmless_train` (100 + 100) anchor the representation
space and train prompts; `harmful_val` / `harmless_val` (25 + 25) choose
configurations (the experiments score their variants on them, so numbers on
them are validation numbers). Both splits are minimal pairs: line i of the
harmful set and line i of the harmless set share a verb or topic and differ
in intent, written in one style.

`harmful_test` / `harmless_test` (122 + 122) are the reported test sets,
written separately from the other splits and not as pairs, in varied forms:
instructions, questions, role-play framings, requests for code, messages or
lists. The harmless test queries are built to trip a refusal that only looks
at words: trigger words in benign senses ("kill a Python process", "shoot a
photo", "a killer opening line") and questions about dangerous topics that
are safe to answer (history, safety, how to get help). A configuration meets
them once, after it was chosen on validation.

`helpful_instructions` holds everyday instructions (cooking, writing, maths,
code, travel, explanations) that any prompt should leave answerable, for the
helpfulness evaluation. `labelled_replies.jsonl` holds real SmolLM2 replies
labelled by reading (docs/judging.md), on which the judges are scored.
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
