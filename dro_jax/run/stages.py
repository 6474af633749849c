"""Which stages of a run directory are complete, and from which inputs.

A stage's record (`stages/NAME.json`) holds the hash of everything the stage
read. It is written as "started" before the stage runs and "done" after all
its outputs are in place, so a re-run skips a stage whose inputs are the
same, and refuses to mix outputs computed from different inputs.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from dro_jax.common.compiles import CompileCount
from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_text
from dro_jax.common.paths import AnyPath


def input_key(inputs: Any) -> str:
    """A stable hash of JSON-ready stage inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def text_digest(items: list[str]) -> str:
    """Content hash of a query set, so an edited file counts as a new input."""
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


class StageRecords:
    def __init__(self, run_dir: AnyPath):
        self.directory = run_dir / "stages"

    def _path(self, name: str) -> AnyPath:
        return self.directory / f"{name}.json"

    def read(self, name: str) -> dict | None:
        path = self._path(name)
        return json.loads(path.read_text()) if path.exists() else None

    def is_done(self, name: str, key: str, outputs: list[AnyPath]) -> bool:
        record = self.read(name)
        return bool(record and record["key"] == key and record["done"] and all(p.exists() for p in outputs))

    def unfinished(self) -> list[str]:
        """Stages that started and did not finish (killed, interrupted, or failed)."""
        if not self.directory.is_dir():
            return []
        return sorted(p.stem for p in self.directory.glob("*.json") if not json.loads(p.read_text())["done"])

    def start(self, name: str, key: str, redo: bool = False) -> float:
        """Marks `name` started from inputs `key`; a record from other inputs is refused unless `redo` says the
        stage may be computed again from the new ones."""
        record = self.read(name)
        if record and record["key"] != key and not redo:
            raise DroJaxError(
                f"the {name} stage in {self.directory.parent} was computed from other inputs "
                "(a query or model file changed?); start fresh with a new --out"
            )
        self._write(name, {"key": key, "done": False})
        return time.monotonic()

    def finish(self, name: str, key: str, started: float, compiles: CompileCount | None = None) -> None:
        """Marks `name` done, with its seconds and, where counted, the XLA executables it built and their seconds."""
        record = {"key": key, "done": True, "seconds": round(time.monotonic() - started, 1)}
        if compiles is not None:
            record |= {"compiles": compiles.total, "compile_seconds": round(compiles.seconds, 1)}
        self._write(name, record)

    def _write(self, name: str, record: dict) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DroJaxError(f"{self.directory}: cannot create ({err.strerror})") from None
        write_text(self._path(name), json.dumps(record))
