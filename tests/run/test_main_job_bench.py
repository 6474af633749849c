"""`python -m dro_jax.bench run`: the main job cold, then warm from the compilation cache, with each stage's
seconds, XLA executables and compile seconds."""

import json
import os

import pytest

from dro_jax.bench.__main__ import main as bench
from dro_jax.cli.main import main as cli
from dro_jax.common.compiles import use_compilation_cache

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)


@pytest.fixture
def suite_cache():
    """The suite's compilation cache again after the benchmark moved it."""
    yield
    use_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])


def test_the_warm_run_reads_what_the_cold_run_compiled(run_args, tmp_path, capsys, suite_cache):
    assert cli(run_args(tmp_path / "unused", "--settings", "none", "--show-config")) == 0
    config = tmp_path / "config.json"
    config.write_text(capsys.readouterr().out)
    out, figures = tmp_path / "bench", tmp_path / "figures.json"
    assert bench(["run", "--config", str(config), "--out", str(out), "--json", str(figures)]) == 0
    table = capsys.readouterr().out
    runs = json.loads(figures.read_text())["runs"]
    for label in ("cold", "warm"):
        assert set(runs[label]) == {"anchors", "train", "evaluate"} and all(s["compiles"] > 0 for s in runs[label].values())
        assert f"| {label} | total |" in table
    # the same executables, read from the cache instead of compiled
    assert [s["compiles"] for s in runs["warm"].values()] == [s["compiles"] for s in runs["cold"].values()]
    cold, warm = (sum(s["compile_seconds"] for s in runs[label].values()) for label in ("cold", "warm"))
    assert warm < 0.5 * cold, (cold, warm)
    assert any((out / "xla-cache").iterdir())
    assert bench(["run", "--config", str(config), "--out", str(out)]) == 2  # an earlier benchmark is not reused
    assert "holds an earlier benchmark" in capsys.readouterr().err
    assert bench(["run", "--config", str(tmp_path / "missing.json")]) == 2
    assert "no such configuration file" in capsys.readouterr().err
