"""How a prompt moves queries in the anchor space: along the refusal direction versus along the harmfulness direction.

The paper's main finding is that human safety prompts move harmful and
harmless queries alike towards refusal, while hardly changing how harmful
they look; DRO should move the two sets in opposite directions. Shifts are
measured in probe logits against the `none` setting on the same queries.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.tables import markdown_table
from dro_jax.inference.settings import NO_PROMPT


@dataclasses.dataclass(frozen=True)
class Movement:
    """Mean change of the two probe logits against no prompt (refusal: negative = towards refusal;
    harmfulness: negative = looks more harmful), the share of queries moved towards refusal, and the
    mean distance moved in the leading coordinates."""

    setting: str
    dataset: str
    num_queries: int
    refusal_shift: float
    harmfulness_shift: float
    towards_refusal: float
    distance: float
    log_odds_shift: float | None = None  # change of the refusal log-odds (positive: more likely to open with a refusal)


def movements(
    anchors: AnchorSpace, coords: dict[tuple[str, str], np.ndarray], log_odds: dict[tuple[str, str], np.ndarray] | None = None
) -> list[Movement]:
    """`coords[(setting, dataset)]` [n, k] (and optionally the refusal `log_odds` [n]) in the same query order
    per dataset; needs the `none` setting."""
    log_odds = log_odds or {}
    rows = []
    for (setting, dataset), points in coords.items():
        base = coords.get((NO_PROMPT, dataset))
        if base is None:
            continue
        refusal = anchors.refusal.logits(points) - anchors.refusal.logits(base)
        scores, base_scores = log_odds.get((setting, dataset)), log_odds.get((NO_PROMPT, dataset))
        rows.append(Movement(
            setting, dataset, len(points), float(np.mean(refusal)),
            float(np.mean(anchors.harmfulness.logits(points) - anchors.harmfulness.logits(base))),
            float(np.mean(refusal < 0)), float(np.mean(np.linalg.norm(points - base, axis=1))),
            None if scores is None or base_scores is None else float(np.mean(scores - base_scores)),
        ))
    return rows


def movements_markdown(rows: list[Movement]) -> str:
    header = ["setting", "queries", "shift along the refusal direction", "shift along the harmfulness direction",
              "queries moved towards refusal", "mean distance moved", "refusal log-odds shift"]
    return markdown_table(header, [
        [
            row.setting, f"{row.dataset} ({row.num_queries})", f"{row.refusal_shift:+.3f}", f"{row.harmfulness_shift:+.3f}",
            f"{row.towards_refusal:.0%}", f"{row.distance:.3f}", "n/a" if row.log_odds_shift is None else f"{row.log_odds_shift:+.2f}",
        ]
        for row in rows
    ])
