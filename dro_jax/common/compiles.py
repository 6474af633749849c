"""XLA compilations: counting them (the tiny and the large models alike spend their first seconds compiling, and a
pass that compiles once per batch instead of once per shape is the commonest slowdown), and keeping them on disk
so that the next run reads them instead (`use_compilation_cache`)."""

from __future__ import annotations

import collections
import contextlib
import os
from pathlib import Path
from typing import Iterator

import jax

from dro_jax.common.paths import AnyPath, as_path, user_cache_dir

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


def default_cache_dir() -> Path:
    """$JAX_COMPILATION_CACHE_DIR when set, else the user's cache directory: $XDG_CACHE_HOME/dro-jax/xla
    (~/.cache/dro-jax/xla)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return user_cache_dir() / "xla"


def use_compilation_cache(where: str | None = None) -> AnyPath | None:
    """Turns jax's persistent compilation cache on in `where` (None: `default_cache_dir()`), or off ("off").

    Every program is kept, however quickly it compiled (jax keeps only those
    over a second by default; a run's many sub-second programs add up), unless
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise. A later call
    reopens the cache in its new place. Returns the directory, or None when off.
    """
    from jax.experimental.compilation_cache.compilation_cache import reset_cache

    reset_cache()  # jax opens its cache once; a process that compiled before would keep the old directory
    if where == "off":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = as_path(where) if where else default_cache_dir()  # jax reads and writes gs:// caches too
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory
