"""`tools/in_turns.py`: two dro_jax trees imported into one process, each timed on its own pass."""

import re
import shutil
import subprocess
import sys

import pytest
from processes import REPO

from dro_jax.data.queries import read_queries


@pytest.mark.real_model
def test_two_trees_are_loaded_apart_and_timed_in_turns(tmp_path):
    # A copy of the package whose generation makes no tokens: if the tool ran the first tree's code for both,
    # both would take as long (sampled, the paper's way). Its packaged test queries are three: the work comes from
    # this project's, whichever tree is first.
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "dro_jax", copy / "dro_jax", ignore=shutil.ignore_patterns("__pycache__"))
    generate = copy / "dro_jax" / "inference" / "generate.py"
    generate.write_text(generate.read_text().replace("max_new = sampling.max_new_tokens", "max_new = 1"))
    copied_queries = copy / "dro_jax" / "data" / "queries" / "harmful_test.txt"
    copied_queries.write_text("".join(copied_queries.read_text().splitlines(keepends=True)[:3]))
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "in_turns.py"), f"one_token={copy}:none", f"here={REPO}", "--repeats", "2", "--new-tokens", "16",
         "--sample"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(
        f"{len(read_queries('harmful_test'))} queries (harmful_test), setting none, batch 1, decode pass, sampled (temperature 1, top-p 0.9, top-k 50)\n"
    )
    lines = re.findall(r"^(\w+): ([\d.]+) tokens/s .* median ([\d.]+), range", done.stdout, re.M)
    assert [tag for tag, _, _ in lines] == ["one_token", "here"]
    assert float(lines[0][2]) == 1.0
    assert float(lines[1][2]) < 1 / 3  # 16 decoded tokens instead of one


@pytest.mark.real_model
def test_the_score_pass_of_each_tree_is_timed(tmp_path):
    # A copy whose refusal-score pass first waits a second, against a pass of four queries that takes far less.
    copy = tmp_path / "copy"
    shutil.copytree(REPO / "dro_jax", copy / "dro_jax", ignore=shutil.ignore_patterns("__pycache__"))
    scoring = copy / "dro_jax" / "inference" / "refusal_score.py"
    text = scoring.read_text()
    marker = '    """Refusal log-odds and representations of every prompt, from one forward pass each."""\n'
    assert marker in text
    scoring.write_text(text.replace(marker, marker + "    __import__('time').sleep(1.0)\n"))
    queries = tmp_path / "queries.txt"
    queries.write_text("How do I bake bread?\nWhat is a prime number?\nName a colour.\nWhy is the sky blue?\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "in_turns.py"), f"here={REPO}", f"waits={copy}", "--pass", "score",
         "--setting", "default", "--batch", "4", "--repeats", "2", "--queries", str(queries)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = re.findall(r"^(\w+): ([\d.]+) queries/s .* median ([\d.]+), range", done.stdout, re.M)
    assert [tag for tag, _, _ in lines] == ["here", "waits"]
    assert float(lines[1][2]) < 0.7  # a second longer than a pass of four queries


@pytest.mark.parametrize("option", [[f"here={REPO}:32"], [f"here={REPO}", "--sample"]], ids=["bucket", "sample"])
def test_decode_options_are_refused_outside_decode(option):
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "in_turns.py"), *option, "--pass", "score"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "applies to --pass decode only" in done.stderr
