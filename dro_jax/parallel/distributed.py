"""Several processes (hosts) on one job: joining it, splitting work, sharing results.

Each process evaluates its own contiguous part of the work on its local
devices; the results are then exchanged with `process_allgather`, so every
process ends with the whole. On CPU that collective runs over gloo, jax's
default CPU collectives once `jax.distributed` is initialized.
"""

from __future__ import annotations

import json
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from dro_jax.common.errors import DroJaxError

T = TypeVar("T")


AUTO = "auto"  # --coordinator auto: jax finds the job itself (TPU pods, SLURM, ...)


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins a multi-process job (all three given, or `coordinator` "auto" alone, where jax detects the
    cluster), or does nothing (none given: one process).

    Must run before anything touches a jax device. A process joins once: later calls (a second command run
    in the same process) keep the job it joined.
    """
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if coordinator == AUTO:
        if any(given[1:]):
            raise DroJaxError("--coordinator auto finds the processes itself: leave out --num-processes and --process-id")
        _join()
        return
    if not all(given):
        raise DroJaxError("a multi-process run needs all of --coordinator, --num-processes and --process-id")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise DroJaxError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not 0 <= process_id < num_processes:
        raise DroJaxError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    _join(coordinator, num_processes, process_id)


def _join(*args) -> None:
    if jax.distributed.is_initialized():
        return
    try:
        jax.distributed.initialize(*args)
    except (RuntimeError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = f"the job at {args[0]} as process {args[2]}" if args else "the job jax detects (--coordinator auto)"
        raise DroJaxError(f"cannot join {where}: {first_line}") from None


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (e.g. after process 0 wrote a file the others read)."""
    if jax.process_count() > 1:
        from jax.experimental.multihost_utils import sync_global_devices

        sync_global_devices(name)


def is_writer() -> bool:
    """Whether this process writes the job's files: process 0 does, the others compute alongside it."""
    return jax.process_index() == 0


def shows_progress(progress: bool) -> bool:
    """Whether this process draws progress bars: asked for, and process 0 (one set of bars per job, not per host)."""
    return progress and is_writer()


def process_zero_decides(decide: Callable[[], T]) -> T:
    """`decide()` run on process 0 alone, its JSON-serialisable answer (or its `DroJaxError`) given to every
    process.

    For every decision that reads shared storage (does a run exist, is a stage
    done, which checkpoint is the last): on NFS or gcsfuse, hosts may see a
    file at different times, and hosts that decide differently hang in the
    next collective or write twice. It is a collective: every process calls it
    at the same point, and none passes it before process 0 has decided.
    """
    if jax.process_count() == 1:
        return decide()
    answer = None
    if is_writer():
        try:
            answer = {"value": decide()}
        except DroJaxError as err:
            answer = {"error": str(err)}
    answer = allgather_json(answer)[0]
    if "error" in answer:
        raise DroJaxError(answer["error"])
    return answer["value"]


def process_share(num_items: int, index: int | None = None, count: int | None = None) -> range:
    """The items of `range(num_items)` that process `index` (default: this one) of `count` handles: every
    `count`-th from `index`, so that a list sorted by length or topic is shared out evenly."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return range(index, num_items, count)


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-serialisable `value`, in process order, on every process.

    Every process must call it at the same point of the run. Floats survive
    exactly (JSON keeps their shortest round-trip form).
    """
    if jax.process_count() == 1:
        return [value]
    from jax.experimental.multihost_utils import process_allgather

    payload = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    sizes = np.asarray(process_allgather(np.array([payload.size], np.int32))).reshape(-1)
    padded = np.zeros(max(int(sizes.max()), 1), np.uint8)
    padded[: payload.size] = payload
    gathered = np.asarray(process_allgather(padded))
    return [json.loads(gathered[p, : sizes[p]].tobytes().decode("utf-8")) for p in range(len(sizes))]
