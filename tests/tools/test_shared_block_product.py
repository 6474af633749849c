"""`tools/shared_block_product.py`: the shared block's product timed both ways, after checking that they agree."""

import importlib.util
import re

import pytest
from processes import REPO


def _tool():
    spec = importlib.util.spec_from_file_location("shared_block_product", REPO / "tools" / "shared_block_product.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_slot_count_gets_both_timings(capsys):
    _tool().main(["--batch", "2", "--tokens", "3", "--slots", "5", "9", "--repeats", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.match(r"(\d+) slots: matmul per head [\d.]+ ms, broadcast einsum [\d.]+ ms; einsum / matmul [\d.]+", line)[1])
            for line in lines] == [5, 9]


def test_ways_that_disagree_are_not_timed(monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool, "broadcast_einsum", lambda rows, shared: 2 * tool._times_shared(rows, shared))
    with pytest.raises(SystemExit, match="5 slots: the two ways disagree"):
        tool.main(["--batch", "2", "--tokens", "3", "--slots", "5", "--repeats", "1"])
