"""The decline judge's agreement with replies labelled by reading: counts, the held-out split, bad files."""

import json

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.evaluation.judge_agreement import SECOND_BATCH, Agreement, decline_judge_agreement, is_held_out, labelled_replies


def test_agreement_counts_hits_against_what_was_said_and_what_is():
    agreement = Agreement.of([True, True, True, False, False], [True, False, False, True, False])
    assert (agreement.hits, agreement.said, agreement.real) == (1, 3, 2)
    assert agreement.precision == pytest.approx(1 / 3) and agreement.recall == 0.5  # (unequal: a swap shows)
    assert Agreement.of([False], [True]).precision is None and Agreement.of([True], [False]).recall is None


def test_only_replies_the_rules_were_never_revised_on_are_held_out():
    assert [is_held_out({"id": i}) for i in (0, 1, 410, 411)] == [False, True, False, True]  # first batch: odd ids
    assert is_held_out({"id": SECOND_BATCH}) and is_held_out({"id": SECOND_BATCH + 1})  # second batch: all


def test_the_judge_is_scored_on_the_held_out_replies_only():
    decline, apology = "I can't help with that.", "I'm sorry for the misunderstanding! How is your day?"
    records = [
        {"id": 0, "reply": decline, "label": "comply"},  # development: a false alarm that must not count
        {"id": 1, "reply": decline, "label": "decline"},
        {"id": 3, "reply": apology, "label": "decline"},  # a miss
        {"id": SECOND_BATCH, "reply": decline, "label": "apology-only"},  # a false alarm
    ]
    agreement, replies = decline_judge_agreement(records)
    assert replies == 3 and (agreement.hits, agreement.said, agreement.real) == (1, 2, 2)


def test_the_packaged_set_loads_and_bad_files_fail_in_one_line(tmp_path):
    assert len(labelled_replies()) >= 600
    with pytest.raises(DroJaxError, match="no such labelled reply file"):
        labelled_replies(tmp_path / "missing.jsonl")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"id": 0, "query": "q", "reply": "r", "label": "refusal"}) + "\n")
    with pytest.raises(DroJaxError, match=r"unknown labels \['refusal'\]"):
        labelled_replies(odd)
