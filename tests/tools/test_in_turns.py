"""`tools/decode_in_turns.py`: two dro_jax trees imported into one process, each timed on its own generation."""

import re
import shutil
import subprocess
import sys

import pytest
from processes import REPO


@pytest.mark.real_model
def test_two_trees_are_loaded_apart_and_timed_in_turns(tmp_path):
    # A copy of the package whose generation makes no tokens: if the tool ran the first tree's code for both,
    # both would take as long.
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "dro_jax", copy / "dro_jax", ignore=shutil.ignore_patterns("__pycache__"))
    generate = copy / "dro_jax" / "inference" / "generate.py"
    generate.write_text(generate.read_text().replace("max_new = sampling.max_new_tokens", "max_new = 1"))
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "decode_in_turns.py"), f"here={REPO}", f"one_token={copy}:none", "--repeats", "2", "--new-tokens", "16"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = re.findall(r"^(\w+): ([\d.]+) tokens/s .* median ([\d.]+), range", done.stdout, re.M)
    assert [tag for tag, _, _ in lines] == ["here", "one_token"]
    assert float(lines[0][2]) == 1.0
    assert float(lines[1][2]) > 3  # one decoded token instead of 16
