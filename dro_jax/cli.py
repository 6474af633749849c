"""The `dro-jax` command line: argument parsing and error reporting only."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from dro_jax.chat import PROMPT_SETTINGS
from dro_jax.errors import DroJaxError
from dro_jax.loading.registry import DEFAULT_MODEL, DTYPES

EXIT_USER_ERROR = 2


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}', a HF model directory or a .gguf file (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype (default: %(default)s)")


def _add_query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queries",
        required=True,
        help="a packaged set (harmful_train, harmless_train, harmful_test, harmless_test) or a file: "
        ".txt (one query per line), .csv or .jsonl",
    )
    parser.add_argument("--field", help="column (.csv) or field (.jsonl) holding the query (default: query)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dro-jax", description="Directed Representation Optimization for safety prompts, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    represent = commands.add_parser(
        "represent",
        help="last-layer, final-norm hidden states at the last input position of chat-formatted queries",
    )
    _add_model_args(represent)
    _add_query_args(represent)
    represent.add_argument(
        "--system-prompt",
        default="none",
        help=f"one of {', '.join(PROMPT_SETTINGS)}, or custom text (default: %(default)s)",
    )
    represent.add_argument("--batch-size", type=_positive_int, default=32, help="queries per forward pass (default: %(default)s)")
    represent.add_argument("--out", required=True, help="output .npy file: float32 [n_queries, hidden]")
    represent.set_defaults(run=_run_represent)
    return parser


def _run_represent(args: argparse.Namespace) -> None:
    import numpy as np

    from dro_jax.chat import resolve_system_prompt
    from dro_jax.files import atomic_output, check_writable
    from dro_jax.loading import load_model
    from dro_jax.queries import read_queries
    from dro_jax.represent import represent_queries

    out = check_writable(args.out)
    queries = read_queries(args.queries, args.field)
    system_prompt = resolve_system_prompt(args.system_prompt)
    model = load_model(args.model, args.dtype)
    states = represent_queries(model, queries, system_prompt, args.batch_size, source=args.queries)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, states)
    print(f"wrote {out}: {states.shape[0]} x {states.shape[1]} float32", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DroJaxError as err:
        print(f"dro-jax: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("dro-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
