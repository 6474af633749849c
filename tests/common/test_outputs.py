"""Shared output helpers: atomic files, result tables, and the run-directory guard."""

import json
import os

import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import atomic_output, write_jsonl, write_text
from dro_jax.common.run_directory import claim_run_directory
from dro_jax.common.tables import markdown_table


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old")
    with pytest.raises(DroJaxError, match="a.txt: cannot write"):
        with atomic_output(path) as tmp:
            tmp.write_text("half")
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_jsonl_keeps_text_as_it_is(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "café ✓"}, {"n": 2}])
    assert path.read_text(encoding="utf-8") == '{"text": "café ✓"}\n{"n": 2}\n'


def test_markdown_cells_stay_on_one_line():
    table = markdown_table(["a", "b"], [["x | y", "two\nlines"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x \\| y | two lines |"]


def test_a_run_directory_belongs_to_one_set_of_settings(tmp_path):
    root = tmp_path / "run"
    assert claim_run_directory(root, {"lr": 0.1, "epochs": 2}, resume=False) == root
    assert json.loads((root / "config.json").read_text()) == {"lr": 0.1, "epochs": 2}
    assert claim_run_directory(root, {"lr": 0.1, "epochs": 2}, resume=False) == root  # same settings: fine
    with pytest.raises(DroJaxError, match=r"other settings \(epochs: 2 -> 3, lr: 0.1 -> 0.2\)"):
        claim_run_directory(root, {"lr": 0.2, "epochs": 3}, resume=True)
    busy = lambda directory: "a training run" if directory == root else None
    with pytest.raises(DroJaxError, match="holds a training run; pass --resume"):
        claim_run_directory(root, {"lr": 0.1, "epochs": 2}, resume=False, in_progress=busy)
    assert claim_run_directory(root, {"lr": 0.1, "epochs": 2}, resume=True, in_progress=busy) == root
    assert json.loads((root / "config.json").read_text()) == {"lr": 0.1, "epochs": 2}
