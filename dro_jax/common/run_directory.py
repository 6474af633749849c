"""A run directory belongs to one set of settings, kept in its `config.json`.

`dro-jax run` and `dro-jax train` both write into a directory that later calls
continue (`--resume`) or re-render; mixing outputs computed from different
settings, or silently restarting over a stopped run, would give results that
match no command. `claim_run_directory` is the one guard against both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_text

CONFIG_NAME = "config.json"


def claim_run_directory(
    root: str | Path, settings: dict, resume: bool, in_progress: Callable[[Path], str | None] = lambda root: None
) -> Path:
    """Creates `root` with `settings` as its config.json, or checks that an existing one holds these settings.

    `in_progress(root)` describes work that `--resume` would continue (e.g.
    "an unfinished run (stopped in: evaluate)"), or returns None; such a
    directory is refused without `resume`.
    """
    root = Path(root)
    path = root / CONFIG_NAME
    if path.exists():
        saved = json.loads(path.read_text())
        changed = sorted(k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed[:4])
            raise DroJaxError(
                f"{root} holds a run with other settings ({shown}{', ...' if len(changed) > 4 else ''}); "
                f"rerun with the same settings, or start fresh with a new --out (or delete {root})"
            )
        busy = in_progress(root)
        if busy and not resume:
            raise DroJaxError(f"{root} holds {busy}; pass --resume to continue it, or choose a new --out")
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DroJaxError(f"{root}: cannot create the run directory ({err.strerror})") from None
    write_text(path, json.dumps(settings, indent=2))
    return root
