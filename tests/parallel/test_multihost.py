"""Two processes x 4 forced CPU devices on localhost as one job: `train` (one host preempted by SIGTERM, then
resumed) and `run` give what one device gives (the reference runs in the test's own process), with the weights
split across both processes, and only process 0 writes the outputs."""

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dro_jax.cli.main import main
from dro_jax.inference.settings import load_soft_prompt
from processes import finish, free_port, host_args, start

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

WORKER = str(Path(__file__).with_name("host_worker.py"))


def _command(record: Path, args: list[str]) -> list[str]:
    return [sys.executable, WORKER, str(record), *args]


def _two_processes(tmp: Path, name: str, args: list[str], stale: bool = False) -> list:
    """The two processes of a job; `stale`: process 1 sees no checkpoints and no finished stages (host_worker.py)."""
    port = free_port()
    return [
        start(_command(tmp / f"{name}-writes{i}.json", [*args, *host_args(port, i)]), devices=4, STALE_VIEW=str(int(stale and i == 1)))
        for i in range(2)
    ]


def _written(tmp: Path, name: str, index: int, under: Path) -> tuple[set[str], set[str]]:
    """(names of the files process `index` opened for writing from Python under `under` outside checkpoints/,
    those inside); orbax writes a checkpoint from every process."""
    paths = [Path(p) for p in json.loads((tmp / f"{name}-writes{index}.json").read_text()) if p.startswith(str(under.resolve()))]
    inside = {p.name for p in paths if "checkpoints" in p.parts}
    return {p.name for p in paths if "checkpoints" not in p.parts}, inside


def _wrote(names: set[str], output: str) -> bool:
    """Whether `output` is among the written names (files are written to a temporary name and renamed)."""
    return any(output in name for name in names)


def test_two_hosts_train_and_resume_like_one(tiny_dro, tmp_path, query_files):
    anchors = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")

    def train(out: Path, *extra: str) -> list[str]:
        return ["train", "--model", str(tiny_dro.directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
                "--anchors", str(anchors), "--epochs", "8", "--batch-size", "4", "--lr", "1e-2", "--checkpoint-every", "5",
                "--out", str(out), *extra]

    assert main(train(tmp_path / "one")) == 0
    want = load_soft_prompt(tmp_path / "one" / "soft_prompt.safetensors")

    two = tmp_path / "two"
    processes = _two_processes(tmp_path, "stopped", train(two, "--mesh", "fsdp=8"))
    deadline = time.time() + 400
    while time.time() < deadline and not (two / "checkpoints" / "5").exists() and all(p.poll() is None for p in processes):
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGTERM)  # a preempted host: the other one hears of it through the job
    try:
        errors = [process.communicate(timeout=300)[1] for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert [p.returncode for p in processes] == [143, 143], errors[0][-2000:] + errors[1][-2000:]
    saved = max(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit())
    assert 5 < saved < 24, "both processes save the step they stopped after, between the periodic checkpoints"
    assert not (two / "soft_prompt.safetensors").exists()  # it was stopped mid-run

    # Process 1 sees no checkpoint (a lagging view of shared storage): it follows process 0's decision to resume.
    finish(_two_processes(tmp_path, "resumed", train(two, "--mesh", "fsdp=8", "--resume"), stale=True))
    got = load_soft_prompt(two / "soft_prompt.safetensors")
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    steps = [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 25))
    first, second = _written(tmp_path, "resumed", 0, two), _written(tmp_path, "resumed", 1, two)
    # (safetensors writes from Rust, out of the audit hook's sight: the prompt file's existence shows process 0 wrote it)
    assert _wrote(first[0], "metrics.jsonl") and first[1]
    assert second[0] == set()  # process 1 takes part in the checkpoints and writes nothing else


def test_two_hosts_run_the_main_job_like_one(run_args, tmp_path):
    # One human setting besides DRO, and no replies term (which generates before training), keep it short: what is
    # checked is that two hosts compute what one device does.
    settings = ["--settings", "none", "--loss-weights", "1", "0.01", "0.001", "0", "0"]
    assert main(run_args(tmp_path / "one", *settings)) == 0
    # Each host's 4 devices on model=4, the two hosts on data=2 (--dcn-mesh: the axis that crosses the slower network).
    outputs = finish(_two_processes(tmp_path, "run", run_args(tmp_path / "two", *settings, "--mesh", "data=2,model=4", "--dcn-mesh", "data=2")))
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert one.keys() == two.keys()
    for row_one, row_two in zip(one["rows"], two["rows"], strict=True):
        for key, value in row_one.items():
            if isinstance(value, float):
                assert row_two[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
            else:
                assert row_two[key] == value, key
    assert "| DRO |" in outputs[0] and "| DRO |" not in outputs[1]  # only process 0 prints the table
    assert _wrote(_written(tmp_path, "run", 0, tmp_path / "two")[0], "results.md")
    assert _written(tmp_path, "run", 1, tmp_path / "two")[0] == set()
