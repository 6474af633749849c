"""The `dro-jax` command line: the parser of every command group, and error reporting."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dro_jax.cli import compare, dro, helpfulness, inference, run, sweep
from dro_jax.common.errors import DroJaxError
from dro_jax.models.config import MATMUL_PRECISIONS, set_matmul_precision

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
COMMAND_GROUPS = (inference, run, dro, compare, sweep, helpfulness)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dro-jax", description="Directed Representation Optimization for safety prompts, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; a user error is one line on stderr and exit status 2; SIGTERM (preemption) exit status 143
    and Ctrl-C 130, training stopping at a step boundary after a checkpoint (see dro_jax.parallel.preemption)."""
    args = build_parser().parse_args(argv)
    from dro_jax.common.compiles import use_compilation_cache  # here, not at the top: --help needs no jax
    from dro_jax.parallel.preemption import Stopped, exit_status, stop_on_signals

    if getattr(args, "precision", None):  # the commands that run a model
        use_compilation_cache(args.compilation_cache)
        set_matmul_precision(args.precision)
        if args.precision != "highest":
            print(f"dro-jax: matmul precision {args.precision}: {MATMUL_PRECISIONS[args.precision][1]}", file=sys.stderr)
    try:
        with stop_on_signals():
            args.run(args)
    except DroJaxError as err:
        print(f"dro-jax: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Stopped as stopped:
        print(f"dro-jax: stopped by {stopped}", file=sys.stderr)
        return exit_status(stopped)
    except KeyboardInterrupt:
        print("dro-jax: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
