"""How well a refusal judge agrees with the packaged replies labelled by reading (docs/judging.md).

`dro_jax/data/labelled_replies.jsonl` holds real SmolLM2 replies, each
labelled `decline`, `comply`, `apology-only` or `off-topic`. The decline
judge's rules were revised against the first batch's even ids only; its odd
ids and the whole second batch (drawn after the last revision) are held out,
and their agreement is the one to quote: every run's report states it.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path
from dro_jax.judging.declines import DeclineJudge

LABELS = ("decline", "comply", "apology-only", "off-topic")
SECOND_BATCH = 412  # the first id of the replies drawn after the decline judge's rules were last revised


def labelled_replies(path: str | Path | None = None) -> list[dict]:
    """The labelled replies of `path` (default: the packaged set), each a dict with `id`, `query`, `reply`, `label`."""
    source = as_path(path) if path else Path(str(resources.files("dro_jax.data") / "labelled_replies.jsonl"))
    if not source.is_file():
        raise DroJaxError(f"{source}: no such labelled reply file")
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = {r["label"] for r in records} - set(LABELS)
    if unknown:
        raise DroJaxError(f"{source}: unknown labels {sorted(unknown)} (the labels are {', '.join(LABELS)})")
    return records


def is_held_out(record: dict) -> bool:
    """Whether the decline judge's rules were never revised against this reply."""
    return record["id"] >= SECOND_BATCH or record["id"] % 2 == 1


@dataclasses.dataclass(frozen=True)
class Agreement:
    """A judge's verdicts against the labels: `hits` replies it calls positive that are, of `said` it calls
    positive and `real` that are."""

    hits: int
    said: int
    real: int

    @classmethod
    def of(cls, predicted: Sequence[bool], actual: Sequence[bool]) -> "Agreement":
        return cls(sum(p and a for p, a in zip(predicted, actual, strict=True)), sum(predicted), sum(actual))

    @property
    def precision(self) -> float | None:
        return self.hits / self.said if self.said else None

    @property
    def recall(self) -> float | None:
        return self.hits / self.real if self.real else None


def decline_judge_agreement(records: Sequence[dict] | None = None) -> tuple[Agreement, int]:
    """The decline judge's refusals against the label `decline` on the held-out replies, and how many those are."""
    held_out = [r for r in (labelled_replies() if records is None else records) if is_held_out(r)]
    judge = DeclineJudge()
    return Agreement.of([judge.is_refusal(r["reply"]) for r in held_out], [r["label"] == "decline" for r in held_out]), len(held_out)
