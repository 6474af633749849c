"""Counting XLA compilations: the tiny and the large models alike spend their first seconds compiling, and a
pass that compiles once per batch instead of once per shape is the commonest slowdown."""

from __future__ import annotations

import collections
import contextlib
from typing import Iterator

import jax

# Recorded around every XLA executable jax builds for a jitted program, whether compiled now or read from the
# persistent compilation cache; its `fun_name` is the jitted function's name.
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCount:
    """Executables built while the count was open, per jitted program name ("jit(final_states)"), with the seconds they took."""

    def __init__(self) -> None:
        self.by_function: collections.Counter[str] = collections.Counter()
        self.seconds = 0.0

    @property
    def total(self) -> int:
        return sum(self.by_function.values())

    def _record(self, event: str, duration: float, **kwargs: str | int) -> None:
        if event == _BACKEND_COMPILE:
            self.by_function[str(kwargs.get("fun_name", "?"))] += 1
            self.seconds += duration


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Counts the executables built inside the `with` block (in this process)."""
    count = CompileCount()
    jax.monitoring.register_event_duration_secs_listener(count._record)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(count._record)
