"""Writing outputs so that a failure never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from dro_jax.common.errors import DroJaxError


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


def write_text(path: str | Path, text: str) -> Path:
    """Writes UTF-8 text atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """One JSON object per line, UTF-8 (non-ASCII text kept as it is), written atomically."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
