"""Stopping on a signal without losing work: SIGTERM (what a preempted TPU VM, a SLURM job at its time limit or
`kill` sends) and SIGINT (Ctrl-C).

Outside training either signal stops the job at once, as Ctrl-C always did.
Inside training (`steps_may_finish`) the first signal only asks to stop: the
running step finishes, every process learns whether any of them was asked
(one small collective per step, so a signal that reaches one host stops all
of them at the same step), a checkpoint is saved and the job exits with
`Stopped`. A second signal stops at once.

With several processes, SIGTERM belongs to jax: `jax.distributed` installs
its preemption service, which catches it on whichever host gets it and
agrees with the others on a step to stop at
(`multihost_utils.reached_preemption_sync_point`, asked after every step).
Outside training such a job then finishes its stage (the stages are
resumable) and stops at the next training step, if any.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from typing import Iterator

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(KeyboardInterrupt):
    """The job stopped on a signal; `signum` says which (the exit status is 128 + signum, the shell's convention)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclasses.dataclass
class _StopRequest:
    """What the handlers share: whether a step is running that may finish first, and the signal that asked."""

    deferring: bool = False
    signum: int | None = None


_REQUEST = _StopRequest()


def _on_signal(signum: int, frame: object) -> None:
    if _REQUEST.deferring and _REQUEST.signum is None:
        _REQUEST.signum = signum
        return
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Stopped` (or, inside `steps_may_finish`, ask to stop) while the block runs; the
    previous handlers come back after it. Signals can only be handled in the main thread: elsewhere this does nothing."""
    try:
        previous = {signum: signal.signal(signum, _on_signal) for signum in STOP_SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def steps_may_finish() -> Iterator[None]:
    """While the block runs, a first signal waits for `stop_requested()` instead of interrupting."""
    _REQUEST.deferring, _REQUEST.signum = True, None
    try:
        yield
    finally:
        _REQUEST.deferring, _REQUEST.signum = False, None


def stop_requested(step: int) -> int | None:
    """The signal any process was asked to stop by since `steps_may_finish` began (None: none), asked after
    training step `step`. Every process must call it after every step: with several processes it is a collective
    (jax's preemption sync point, and one gather of a fixed-shape int, which compiles once)."""
    if jax.process_count() == 1:
        return _REQUEST.signum
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
        return signal.SIGTERM
    asked = np.asarray(multihost_utils.process_allgather(np.array([_REQUEST.signum or 0], np.int32))).reshape(-1)
    return int(asked.max()) or None


def exit_status(stopped: Stopped) -> int:
    """128 + the signal's number: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + stopped.signum
