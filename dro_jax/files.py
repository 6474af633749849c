"""Writing outputs so that a failure never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from dro_jax.errors import DroJaxError


def check_writable(path: str | Path) -> Path:
    """Fails early, before any expensive work, if `path` cannot be written."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DroJaxError(f"{path}: the output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DroJaxError(f"{path}: the output directory {parent} is not writable")
    if path.is_dir():
        raise DroJaxError(f"{path}: is a directory, expected a file name")
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` and renames it into place only on success."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise DroJaxError(f"{path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
