"""Resumable training state on disk, through orbax's CheckpointManager.

Each kept step holds the soft prompt and optimizer state (a pytree) and a
JSON record (step, data order, the model it belongs to). Orbax writes a step
into a temporary directory and renames it when complete, so a kill mid-save
leaves the previous steps intact and no half-written step behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path, is_remote


class TrainCheckpoints:
    def __init__(self, directory: str | Path, keep: int = 3):
        import orbax.checkpoint as ocp

        directory = as_path(directory)
        self.directory = directory if is_remote(directory) else directory.absolute()  # orbax wants absolute local paths
        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "record"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, record: dict) -> None:
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(state), record=self._ocp.args.JsonSave(record))
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except OSError as err:  # orbax renames a finished step into place: a failed save leaves the kept steps intact
            raise DroJaxError(f"{self.directory}: cannot write the checkpoint of step {step} ({err.strerror or err})") from None

    def resolve_step(self, step: int | None = None) -> int:
        """A kept step: `step` itself, or the latest when None; a clear error when there is none. It reads this host's
        listing: with several processes, let process 0 resolve it and hand the step to `record` and `restore`."""
        steps = self._manager.all_steps()
        if not steps:
            raise DroJaxError(f"{self.directory}: no checkpoint found")
        if step is not None and step not in steps:
            raise DroJaxError(f"{self.directory}: no checkpoint for step {step} (kept: {', '.join(map(str, sorted(steps)))})")
        return max(steps) if step is None else step

    def record(self, step: int) -> dict:
        """The JSON record of `step`. With several processes orbax reads it on all together: every process calls it,
        with the same step."""
        return self._manager.restore(step, args=self._ocp.args.Composite(record=self._ocp.args.JsonRestore()))["record"]

    def restore(self, like: Any, step: int) -> tuple[Any, dict]:
        """(state shaped like `like`, record) of `step`; `like=None` restores as saved. Collective, as `record`."""
        abstract = None if like is None else jax.tree.map(self._ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step, args=self._ocp.args.Composite(state=self._ocp.args.StandardRestore(abstract), record=self._ocp.args.JsonRestore())
        )
        return restored["state"], restored["record"]

    def close(self) -> None:
        self._manager.close()
