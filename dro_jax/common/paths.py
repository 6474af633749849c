"""Paths on local disks and in object stores (gs://, s3://, ...), where pod jobs keep their models and outputs.

A path given as a URI becomes an `etils.epath.Path` (the path type orbax
uses), which reads and writes through fsspec's filesystem for its scheme
(gcsfs for gs://, s3fs for s3://: install the one you need); any other path
stays a `pathlib.Path`, so local behaviour is exactly pathlib's. Both answer
the same methods (`/`, `exists`, `is_file`, `read_text`, `mkdir`, `glob`, ...).
Libraries that need a file on the local disk (safetensors, numpy's memory
maps, matplotlib, tokenizers) get one through `local_copy` and `atomic_output`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Union

from etils import epath

AnyPath = Union[Path, epath.Path]
PathLike = Union[str, os.PathLike]


def is_remote(spec: PathLike) -> bool:
    """Whether `spec` names a file in an object store (a URI such as gs://bucket/run), not on the local disk."""
    return "://" in os.fspath(spec)


def as_path(spec: PathLike) -> AnyPath:
    """An epath.Path for a URI, a pathlib.Path for anything else."""
    return epath.Path(spec) if is_remote(spec) else Path(spec)


def user_cache_dir() -> Path:
    """dro-jax's folder in the user's cache directory: $XDG_CACHE_HOME/dro-jax (~/.cache/dro-jax)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dro-jax"


def remote_cache_dir() -> Path:
    """Where remote models are copied to be read locally: `user_cache_dir()`/remote."""
    return user_cache_dir() / "remote"


def local_copy(path: AnyPath) -> Path:
    """`path` itself when local; else a copy of the remote file, or of the files directly inside the remote
    directory, in `remote_cache_dir()` (kept: a file already there with the same size is not fetched again).

    Checkpoint readers map files into memory and read them in parts, which
    object stores do not offer; each host keeps its own copy.
    """
    if not isinstance(path, epath.Path):
        return Path(path)
    text = os.fspath(path)
    target = remote_cache_dir() / hashlib.sha256(text.encode()).hexdigest()[:16] / path.name
    if path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for item in path.iterdir():
            if not item.is_dir():
                _fetch(item, target / item.name)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        _fetch(path, target)
    return target


def _fetch(source: epath.Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().length:
        return
    partial = target.with_name(f".{target.name}.{os.getpid()}.part")
    with source.open("rb") as reading, open(partial, "wb") as writing:
        shutil.copyfileobj(reading, writing, 1 << 24)
    os.replace(partial, target)


@contextlib.contextmanager
def local_file(path: AnyPath) -> Iterator[Path]:
    """A local file with `path`'s bytes for the `with` block: `path` itself, or a temporary download."""
    if not isinstance(path, epath.Path):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="dro-jax-") as directory:
        copy = Path(directory) / path.name
        copy.write_bytes(path.read_bytes())
        yield copy
