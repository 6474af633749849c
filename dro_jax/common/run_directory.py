"""A run directory belongs to one set of settings, kept in its `config.json`.

`dro-jax run` and `dro-jax train` both write into a directory that later calls
continue (`--resume`) or re-render; mixing outputs computed from different
settings, or silently restarting over a stopped run, would give results that
match no command. `claim_run_directory` is the one guard against both.
"""

from __future__ import annotations

import json
from typing import Callable, Collection

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_text
from dro_jax.common.paths import AnyPath, PathLike, as_path

CONFIG_NAME = "config.json"


def claim_run_directory(
    root: PathLike,
    settings: dict,
    resume: bool,
    in_progress: Callable[[AnyPath], str | None] = lambda root: None,
    changeable: Collection[str] = (),
) -> AnyPath:
    """Creates `root` with `settings` as its config.json, or checks that an existing one holds these settings.

    `in_progress(root)` describes work that `--resume` would continue (e.g.
    "an unfinished run (stopped in: evaluate)"), or returns None; such a
    directory is refused without `resume`. With `resume`, the settings named in
    `changeable` (those that only a later stage reads, which the caller then
    redoes) may differ from the saved ones: config.json takes the new values.
    `resume` on a directory without a run is refused, so that a mistyped
    `--out` does not start a fresh run.
    """
    root = as_path(root)
    path = root / CONFIG_NAME
    if not path.exists():
        if resume:
            raise DroJaxError(f"{root}: no run to resume here (no {CONFIG_NAME}); leave out --resume to start one")
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DroJaxError(f"{root}: cannot create the run directory ({err.strerror})") from None
        write_text(path, json.dumps(settings, indent=2))
        return root
    saved = json.loads(path.read_text())
    changed = sorted(k for k in set(settings) | set(saved) if saved.get(k) != settings.get(k))
    fixed = [k for k in changed if k not in changeable]
    if changed and (fixed or not resume):
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}" for k in (fixed or changed)[:4])
        more = ", ..." if len(fixed or changed) > 4 else ""
        if fixed:
            allowed = f"; with --resume only {', '.join(sorted(changeable))} may change" if changeable else ""
            advice = f"rerun with the same settings, or start fresh with a new --out (or delete {root}){allowed}"
        else:
            advice = "these only change later stages: add --resume to redo those with the new settings and keep the rest"
        raise DroJaxError(f"{root} holds a run with other settings ({shown}{more}); {advice}")
    busy = in_progress(root)
    if busy and not resume:
        raise DroJaxError(f"{root} holds {busy}; pass --resume to continue it, or choose a new --out")
    if changed:
        write_text(path, json.dumps(settings, indent=2))
    return root
