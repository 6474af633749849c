"""Child processes for the multi-device and multi-host tests: forced CPU devices, localhost jobs, and waiting
for every process with its exit code and stderr in the failure message."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def device_env(devices: int) -> dict:
    """The environment of a process that sees `devices` CPU devices and imports the tests' helpers (the suite's other
    XLA flags, set in conftest.py, are kept)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return {
        **os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def start(command: list[str], devices: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, env={**device_env(devices), **env}, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def host_args(port: int, index: int, count: int = 2) -> list[str]:
    """The command-line options that make a process `index` of a `count`-process job on localhost."""
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(count), "--process-id", str(index)]


def finish(processes: list[subprocess.Popen], timeout: float = TIMEOUT) -> list[str]:
    """Waits for every process (killing all on a timeout); fails with each one's exit code and stderr; returns their stdout."""
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=timeout))
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        pytest.fail(f"timed out after {timeout} s:\n" + "\n".join(p.communicate()[1][-1500:] for p in processes))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    report = "\n".join(f"--- process {i}, exit {p.returncode}:\n{err[-2500:]}" for i, (p, (_, err)) in enumerate(zip(processes, outputs)))
    assert [p.returncode for p in processes] == [0] * len(processes), report
    return [out for out, _ in outputs]
