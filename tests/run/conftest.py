"""A tiny run directory made once per session through `dro-jax run`, for the run, report and experiment tests."""

import pytest

from dro_jax.cli.main import main


@pytest.fixture(scope="session")
def finished_run(run_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(run_args(out)) == 0
    return out
