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


def _add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"'{DEFAULT_MODEL}', a HF model directory or a .gguf file (default: %(default)s)")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    _add_model_arg(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter and activation dtype (default: %(default)s)")


def _add_query_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--queries",
        required=True,
        help="a packaged set (harmful_train, harmless_train, harmful_test, harmless_test) or a file: "
        ".txt (one query per line), .csv or .jsonl",
    )
    parser.add_argument("--field", help="column (.csv) or field (.jsonl) holding the query (default: query)")


def _add_prompt_args(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--system-prompt",
        default="none",
        help=f"one of {', '.join(PROMPT_SETTINGS)}, or custom text (default: %(default)s)",
    )
    prompt.add_argument(
        "--soft-prompt", metavar="FILE", help="a trained soft prompt (safetensors, tensor 'soft_prompt' [N, hidden]) in the system slot"
    )


def _prompt_setting(args: argparse.Namespace):
    """The setting from --system-prompt or --soft-prompt; a soft-prompt file is read (and checked) here."""
    from dro_jax.soft_prompt import SOFT_PREFIX, parse_prompt_setting

    return parse_prompt_setting(SOFT_PREFIX + args.soft_prompt if args.soft_prompt else args.system_prompt)


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _add_decoding_args(parser: argparse.ArgumentParser, samples_default: int, allow_zero_samples: bool = False) -> None:
    decoding = parser.add_argument_group("decoding (default: sampling with temperature 1, top-p 0.9, top-k 50)")
    decoding.add_argument("--greedy", action="store_true", help="greedy decoding (ignores temperature, top-p, top-k)")
    decoding.add_argument("--temperature", type=float, default=1.0)
    decoding.add_argument("--top-p", type=float, default=0.9)
    decoding.add_argument("--top-k", type=int, default=50, help="0 disables the top-k filter")
    decoding.add_argument(
        "--num-samples", type=_non_negative_int if allow_zero_samples else _positive_int, default=samples_default,
        help="responses per query" + (" (0: log-odds only)" if allow_zero_samples else "") + " (default: %(default)s)",
    )
    decoding.add_argument("--max-new-tokens", type=int, default=64)
    decoding.add_argument("--min-new-tokens", type=int, default=0)
    decoding.add_argument("--seed", type=int, default=0, help="fixes every sample (default: %(default)s)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="sequences run together (default: %(default)s)")
    parser.add_argument("--refusal-phrases", help='JSON file {"refusal": [...], "not_refusal": [...]} for the string judge')


def _sampling_and_judge(args: argparse.Namespace):
    from dro_jax.generate import SamplingConfig
    from dro_jax.judges import StringJudge

    sampling = SamplingConfig(
        greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
    )
    judge = StringJudge.from_file(args.refusal_phrases) if args.refusal_phrases else StringJudge.default()
    return sampling, judge


def _write_jsonl(out, records) -> None:
    import json

    from dro_jax.files import atomic_output

    with atomic_output(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dro-jax", description="Directed Representation Optimization for safety prompts, in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)

    represent = commands.add_parser(
        "represent",
        help="last-layer, final-norm hidden states at the last input position of chat-formatted queries",
    )
    _add_model_args(represent)
    _add_query_args(represent)
    _add_prompt_args(represent)
    represent.add_argument("--batch-size", type=_positive_int, default=32, help="queries per forward pass (default: %(default)s)")
    represent.add_argument("--out", required=True, help="output .npy file: float32 [n_queries, hidden]")
    represent.set_defaults(run=_run_represent)

    generate = commands.add_parser("generate", help="sample or greedily decode responses and judge each for refusal")
    _add_model_args(generate)
    _add_query_args(generate)
    _add_prompt_args(generate)
    _add_decoding_args(generate, samples_default=1)
    generate.add_argument("--out", required=True, help="output .jsonl file, one response per line")
    generate.set_defaults(run=_run_generate)

    label = commands.add_parser(
        "label", help="per query and prompt setting: sampled compliance rate and refusal log-odds"
    )
    _add_model_args(label)
    _add_query_args(label)
    label.add_argument(
        "--settings", nargs="+", default=list(PROMPT_SETTINGS),
        help=f"prompt settings to label: {', '.join(PROMPT_SETTINGS)}, soft:FILE (a soft-prompt file) "
        "or custom text (default: the four without a soft prompt)",
    )
    label.add_argument("--soft-prompt", metavar="FILE", action="append", default=[], help="also label under this soft prompt (repeatable)")
    _add_decoding_args(label, samples_default=5, allow_zero_samples=True)
    label.add_argument(
        "--judge-model",
        help="a chat model used as safety classifier (LlamaGuard style): a response then complies only if it is "
        "not a refusal, judged unsafe and longer than two lines (the paper's rule for harmful queries)",
    )
    label.add_argument("--out", required=True, help="output .jsonl file, one label per query and setting")
    label.set_defaults(run=_run_label)

    from dro_jax import cli_compare, cli_dro, cli_run, cli_sweep

    cli_run.add_commands(commands)
    cli_dro.add_commands(commands)
    cli_compare.add_commands(commands)
    cli_sweep.add_commands(commands)
    return parser


def _run_represent(args: argparse.Namespace) -> None:
    import numpy as np

    from dro_jax.files import atomic_output, check_writable
    from dro_jax.loading import load_model
    from dro_jax.queries import read_queries
    from dro_jax.represent import represent_queries

    out = check_writable(args.out)
    queries = read_queries(args.queries, args.field)
    setting = _prompt_setting(args)
    model = load_model(args.model, args.dtype)
    states = represent_queries(model, queries, setting, args.batch_size, source=args.queries)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, states)
    print(f"wrote {out}: {states.shape[0]} x {states.shape[1]} float32", file=sys.stderr)


def _run_generate(args: argparse.Namespace) -> None:
    from dro_jax.files import check_writable
    from dro_jax.loading import load_model
    from dro_jax.queries import read_queries
    from dro_jax.respond import generate_responses

    out = check_writable(args.out)
    sampling, judge = _sampling_and_judge(args)
    queries = read_queries(args.queries, args.field)
    setting = _prompt_setting(args)
    model = load_model(args.model, args.dtype)
    responses = generate_responses(
        model, queries, setting, sampling, args.num_samples, args.seed, args.batch_size, judge, source=args.queries
    )
    _write_jsonl(out, (
        {"query": r.query, "query_index": r.query_index, "sample": r.sample, "setting": setting.name,
         "response": r.text, "num_tokens": r.num_tokens, "refusal": r.refusal}
        for r in responses
    ))
    refused = sum(r.refusal for r in responses)
    print(f"wrote {out}: {len(responses)} responses, {refused} judged refusals", file=sys.stderr)


def _run_label(args: argparse.Namespace) -> None:
    import dataclasses

    from dro_jax.files import check_writable
    from dro_jax.judges import ModelJudge
    from dro_jax.labels import label_queries
    from dro_jax.loading import load_model
    from dro_jax.queries import read_queries
    from dro_jax.soft_prompt import SOFT_PREFIX, parse_prompt_setting

    out = check_writable(args.out)
    sampling, judge = _sampling_and_judge(args)
    specs = args.settings + [SOFT_PREFIX + path for path in args.soft_prompt]
    settings = [parse_prompt_setting(spec) for spec in specs]
    queries = read_queries(args.queries, args.field)
    model = load_model(args.model, args.dtype)
    judge_model = ModelJudge(load_model(args.judge_model, args.dtype)) if args.judge_model else None
    labels = label_queries(
        model, queries, settings, sampling, args.num_samples, args.seed, args.batch_size, judge,
        source=args.queries, judge_model=judge_model,
    )
    _write_jsonl(out, (dataclasses.asdict(label) for label in labels))
    print(f"wrote {out}: {len(labels)} labels ({len(queries)} queries x {len(settings)} settings)", file=sys.stderr)


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
