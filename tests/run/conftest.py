"""A tiny run directory made once per session through `dro-jax run`, for the run, report and experiment tests."""

import json

import pytest

from dro_jax.cli.main import main
from helpers import HARMFUL, HARMLESS


@pytest.fixture(scope="session")
def run_args(tiny_model_dir, tmp_path_factory):
    directory, _ = tiny_model_dir("llama")
    data = tmp_path_factory.mktemp("queries")
    files = {}
    for name, queries in (("harmful", HARMFUL), ("harmless", HARMLESS), ("harmful-test", HARMFUL[:3]), ("harmless-test", HARMLESS[:3])):
        files[name] = data / f"{name}.txt"
        files[name].write_text("\n".join(queries), encoding="utf-8")
    files["openings"] = data / "openings.json"  # single tokens: the tiny model's log-odds stay unsaturated
    files["openings"].write_text(json.dumps({"refusal": ["No"], "compliant": ["Sure"]}))

    def make(out, *extra):
        args = ["run", "--model", str(directory), "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "4",
                "--settings", "none", "short", "--out", str(out)]
        for name, path in files.items():
            args += [f"--{name}", str(path)]
        return args + list(extra)

    return make


@pytest.fixture(scope="session")
def finished_run(run_args, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(run_args(out)) == 0
    return out
