"""Movement against no prompt along the refusal and harmfulness directions, on constructed coordinates."""

import numpy as np
import pytest

from dro_jax.anchors.space import AnchorSpace, LinearProbe
from dro_jax.evaluation.movement import movements, movements_markdown

# Refusal probe reads coordinate 0 (compliance logit), harmfulness probe coordinate 1 (harmlessness logit).
ANCHORS = AnchorSpace(np.zeros(2, np.float32), np.eye(2, dtype=np.float32), 2,
                      LinearProbe(np.array([1.0, 0.0], np.float32), 0.5), LinearProbe(np.array([0.0, 2.0], np.float32), -1.0), {})


def test_shifts_are_probe_logit_changes_against_no_prompt():
    base = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
    moved = base + np.array([[-1.0, 0.5], [0.5, 0.5]], np.float32)
    coords = {("none", "harmful"): base, ("safe", "harmful"): moved, ("safe", "harmless"): moved}  # no 'none' row for harmless
    log_odds = {("none", "harmful"): np.array([-3.0, -1.0]), ("safe", "harmful"): np.array([-1.0, 0.0])}
    rows = {(m.setting, m.dataset): m for m in movements(ANCHORS, coords, log_odds)}
    assert set(rows) == {("none", "harmful"), ("safe", "harmful")}  # a set without the 'none' setting is left out
    safe = rows[("safe", "harmful")]
    assert safe.refusal_shift == pytest.approx(-0.25)  # mean of -1 and +0.5 along coordinate 0
    assert safe.harmfulness_shift == pytest.approx(1.0)  # 2 x 0.5
    assert safe.towards_refusal == pytest.approx(0.5)  # one query of two moved towards refusal
    assert safe.distance == pytest.approx(np.mean([np.hypot(1.0, 0.5), np.hypot(0.5, 0.5)]))
    assert safe.log_odds_shift == pytest.approx(1.5)
    none = rows[("none", "harmful")]
    assert (none.refusal_shift, none.towards_refusal, none.distance, none.log_odds_shift) == (0.0, 0.0, 0.0, 0.0)
    assert movements(ANCHORS, coords)[1].log_odds_shift is None  # without log-odds


def test_movement_table_has_one_line_per_row():
    base = np.zeros((3, 2), np.float32)
    rows = movements(ANCHORS, {("none", "harmless"): base, ("DRO", "harmless"): base - 1.0})
    table = movements_markdown(rows)
    assert table.splitlines()[3] == "| DRO | harmless (3) | -1.000 | -2.000 | 100% | 1.414 | n/a |"
