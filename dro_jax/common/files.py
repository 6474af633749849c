"""Writing outputs so that a failure never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import AnyPath, PathLike, as_path, is_remote


def check_writable(path: PathLike) -> AnyPath:
    """Fails early, before any expensive work, if `path` cannot be written. In an object store there are no
    directories to check: a missing bucket or permission shows when the first file is written."""
    path = as_path(path)
    if is_remote(path):
        if path.is_dir():
            raise DroJaxError(f"{path}: is a directory, expected a file name")
        return path
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DroJaxError(f"{path}: the output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise DroJaxError(f"{path}: the output directory {parent} is not writable")
    if path.is_dir():
        raise DroJaxError(f"{path}: is a directory, expected a file name")
    return path


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Yields a temporary local path and puts its file at `path` only on success: renamed into place beside it on
    a local disk, uploaded in one piece to an object store (which shows an object only once it is whole)."""
    path = as_path(path)
    try:
        if is_remote(path):
            with tempfile.TemporaryDirectory(prefix="dro-jax-") as directory:
                tmp = Path(directory) / path.name
                yield tmp
                path.write_bytes(tmp.read_bytes())
        else:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                yield tmp
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as err:
        raise DroJaxError(f"{path}: cannot write ({err.strerror or err})") from None


def write_text(path: PathLike, text: str) -> AnyPath:
    """Writes UTF-8 text atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return as_path(path)


def write_jsonl(path: PathLike, records: Iterable[dict]) -> AnyPath:
    """One JSON object per line, UTF-8 (non-ASCII text kept as it is), written atomically."""
    return write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
