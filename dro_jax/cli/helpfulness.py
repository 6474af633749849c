"""The `helpfulness` command of `dro-jax`: how well each prompt setting keeps a model answering everyday instructions."""

from __future__ import annotations

import argparse
import sys

from dro_jax.cli.args import add_field_arg, add_model_args, positive_int
from dro_jax.inference.sampling import REFERENCE_SAMPLING
from dro_jax.inference.settings import NO_PROMPT, PROMPT_SETTINGS

DEFAULT_INSTRUCTIONS = "helpful_instructions"


def add_commands(commands) -> None:
    helpfulness = commands.add_parser(
        "helpfulness", help="answers to everyday instructions per prompt setting: reply drift, degenerate answers, over-refusals "
        "and, with --judge-model, the pairwise win rate against a reference setting",
    )
    add_model_args(helpfulness)
    helpfulness.add_argument(
        "--instructions", default=DEFAULT_INSTRUCTIONS,
        help="a packaged set or a .txt/.csv/.jsonl file of instructions (default: %(default)s, 60 everyday instructions)",
    )
    add_field_arg(helpfulness)
    helpfulness.add_argument(
        "--settings", nargs="+", default=list(PROMPT_SETTINGS),
        help="prompt settings: none, default, short, mistral, soft:FILE or text (default: %(default)s)",
    )
    helpfulness.add_argument(
        "--reference-setting", default=NO_PROMPT, help="the setting every other one is compared with; one of --settings (default: %(default)s)"
    )
    helpfulness.add_argument(
        "--judge-model", metavar="MODEL",
        help="a chat model asked which of two answers is more helpful (each pair in both orders); adds the win rate against "
        "the reference setting",
    )
    helpfulness.add_argument(
        "--judge-template", metavar="FILE",
        help="a text file with the judge's user message, holding {instruction}, {answer_a} and {answer_b} (default: a built-in one)",
    )
    helpfulness.add_argument("--max-new-tokens", type=positive_int, default=200, help="answer length (default: %(default)s)")
    helpfulness.add_argument(
        "--sample", action="store_true",
        help=f"sample one answer per instruction (temperature {REFERENCE_SAMPLING.temperature:g}, top-p {REFERENCE_SAMPLING.top_p:g}, "
        f"top-k {REFERENCE_SAMPLING.top_k}) instead of greedy decoding",
    )
    helpfulness.add_argument("--seed", type=int, default=0, help="with --sample (default: %(default)s)")
    helpfulness.add_argument("--batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    helpfulness.add_argument("--out", required=True, help="output directory: helpfulness.md, helpfulness.csv, helpfulness.json, answers.jsonl")
    helpfulness.set_defaults(run=_run_helpfulness)


def _judge_template(path: str | None) -> str:
    from dro_jax.common.errors import DroJaxError
    from dro_jax.common.paths import as_path
    from dro_jax.judging.pairwise import DEFAULT_TEMPLATE

    if path is None:
        return DEFAULT_TEMPLATE
    try:
        return as_path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DroJaxError(f"{path}: cannot read the judge template ({err})") from None


def _run_helpfulness(args: argparse.Namespace) -> None:
    import dataclasses
    from pathlib import Path

    from dro_jax.data.queries import read_queries
    from dro_jax.evaluation.evaluate import EvalConfig
    from dro_jax.inference.settings import parse_prompt_setting
    from dro_jax.evaluation.helpfulness import (
        check_settings, helpfulness_markdown, measure_helpfulness, prepare_helpfulness_dir, write_helpfulness,
    )
    from dro_jax.inference.batched import Batching
    from dro_jax.inference.sampling import SamplingConfig
    from dro_jax.judging.pairwise import ModelPairwiseJudge, check_template
    from dro_jax.loading import load_model

    out = prepare_helpfulness_dir(args.out)
    instructions = read_queries(args.instructions, args.field)
    settings = [parse_prompt_setting(spec) for spec in args.settings]
    check_settings(settings, args.reference_setting)
    template = check_template(_judge_template(args.judge_template))
    sampling = dataclasses.replace(REFERENCE_SAMPLING, max_new_tokens=args.max_new_tokens) if args.sample else SamplingConfig(max_new_tokens=args.max_new_tokens)
    judge = None
    if args.judge_model:
        judge = ModelPairwiseJudge(load_model(args.judge_model, args.dtype, attention=args.attention), template, batch_size=args.batch_size)
    model = load_model(args.model, args.dtype, attention=args.attention)
    source = Path(args.instructions).stem  # a packaged set's name, or the file's
    config = EvalConfig(sampling, seed=args.seed)
    result = measure_helpfulness(model, instructions, settings, args.reference_setting, judge, config, source, Batching(args.batch_size))
    paths = write_helpfulness(result, out)
    print(helpfulness_markdown(result.rows))
    print(f"wrote {', '.join(map(str, paths))}", file=sys.stderr)
