"""Run by test_multihost.py as one process of a job: the `dro-jax` command line with argv[2:], recording into
argv[1] (JSON) every file this process opened for writing, seen through Python's audit hook. With the environment
variable STALE_VIEW=1 the process sees the run directory as a host with a lagging view of shared storage would: no
checkpoints and no finished stages."""

import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND
written: set[str] = set()


def record_writes(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2] if len(args) > 2 else 0
    if (mode is not None and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS):
        written.add(os.path.abspath(os.fsdecode(args[0])))


def see_stale_storage() -> None:
    from dro_jax.dro.checkpoints import TrainCheckpoints
    from dro_jax.run.stages import StageRecords

    TrainCheckpoints.latest_step = lambda self: None
    StageRecords.is_done = lambda self, *args: False


if __name__ == "__main__":
    record = sys.argv[1]
    sys.addaudithook(record_writes)
    if os.environ.get("STALE_VIEW") == "1":
        see_stale_storage()
    from dro_jax.cli.main import main

    code = main(sys.argv[2:])
    found = sorted(written)
    with open(record, "w", encoding="utf-8") as handle:
        json.dump(found, handle)
    sys.exit(code)
