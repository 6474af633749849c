"""`python -m dro_jax.bench anchor|forward|generate|parity|train-step|memory-plan|run`: benchmark and parity tables, the transformers baseline included."""

from __future__ import annotations

import argparse
import sys

from dro_jax.bench import anchor, forward, generation, main_job, memory_plan, parity, train_step
from dro_jax.common.errors import DroJaxError

BENCHMARKS = {"anchor": anchor, "forward": forward, "generate": generation, "parity": parity, "train-step": train_step,
              "memory-plan": memory_plan, "run": main_job}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dro_jax.bench")
    commands = parser.add_subparsers(dest="benchmark", required=True)
    for name, module in BENCHMARKS.items():
        module.add_arguments(commands.add_parser(name, help=(module.__doc__ or "").splitlines()[0]))
    args = parser.parse_args(argv)
    try:
        BENCHMARKS[args.benchmark].run(args)
    except DroJaxError as err:
        print(f"dro_jax.bench: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
