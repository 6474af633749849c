"""The `represent`, `generate` and `label` commands: one model pass over a query set, written to a file."""

from __future__ import annotations

import argparse
import sys

from dro_jax.cli.args import (
    add_decoding_args, add_judge_args, add_model_args, add_prompt_args, add_query_args, check_judge_args, model_judge, positive_int,
    prompt_setting, sampling_config,
)
from dro_jax.inference.settings import PROMPT_SETTINGS


def add_commands(commands) -> None:
    represent = commands.add_parser(
        "represent",
        help="last-layer, final-norm hidden states at the last input position of chat-formatted queries",
    )
    add_model_args(represent)
    add_query_args(represent)
    add_prompt_args(represent)
    represent.add_argument("--batch-size", type=positive_int, default=32, help="queries per forward pass (default: %(default)s)")
    represent.add_argument("--out", required=True, help="output .npy file: float32 [n_queries, hidden]")
    represent.set_defaults(run=_run_represent)

    generate = commands.add_parser("generate", help="sample or greedily decode responses and judge each for refusal")
    add_model_args(generate)
    add_query_args(generate)
    add_prompt_args(generate)
    add_decoding_args(generate, samples_default=1)
    generate.add_argument("--out", required=True, help="output .jsonl file, one response per line")
    generate.set_defaults(run=_run_generate)

    label = commands.add_parser(
        "label", help="per query and prompt setting: sampled compliance rate and refusal log-odds"
    )
    add_model_args(label)
    add_query_args(label)
    label.add_argument(
        "--settings", nargs="+", default=list(PROMPT_SETTINGS),
        help=f"prompt settings to label: {', '.join(PROMPT_SETTINGS)}, soft:FILE (a soft-prompt file) "
        "or custom text (default: the four without a soft prompt)",
    )
    label.add_argument("--soft-prompt", metavar="FILE", action="append", default=[], help="also label under this soft prompt (repeatable)")
    add_decoding_args(label, samples_default=5, allow_zero_samples=True)
    add_judge_args(label, "every response (the queries are taken as harmful ones)")
    label.add_argument("--out", required=True, help="output .jsonl file, one label per query and setting")
    label.set_defaults(run=_run_label)


def _run_represent(args: argparse.Namespace) -> None:
    import numpy as np

    from dro_jax.common.files import atomic_output, check_writable
    from dro_jax.data.queries import read_queries
    from dro_jax.inference.batched import Batching
    from dro_jax.inference.represent import represent_queries
    from dro_jax.loading import load_model

    out = check_writable(args.out)
    queries = read_queries(args.queries, args.field)
    setting = prompt_setting(args)
    model = load_model(args.model, args.dtype, attention=args.attention)
    states = represent_queries(model, queries, setting, args.queries, Batching(args.batch_size))
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, states)
    print(f"wrote {out}: {states.shape[0]} x {states.shape[1]} float32", file=sys.stderr)


def _run_generate(args: argparse.Namespace) -> None:
    from dro_jax.common.files import check_writable, write_jsonl
    from dro_jax.data.queries import read_queries
    from dro_jax.inference.batched import Batching
    from dro_jax.inference.encoding import encode_queries
    from dro_jax.judging.judges import StringJudge
    from dro_jax.judging.responses import generate_responses
    from dro_jax.loading import load_model

    out = check_writable(args.out)
    sampling, judge = sampling_config(args), StringJudge.load(args.refusal_phrases)
    queries = read_queries(args.queries, args.field)
    setting = prompt_setting(args)
    model = load_model(args.model, args.dtype, attention=args.attention)
    encoded = encode_queries(model, queries, setting, args.queries)
    responses = generate_responses(model, encoded, sampling, args.num_samples, args.seed, judge, Batching(args.batch_size))
    write_jsonl(out, (
        {"query": r.query, "query_index": r.query_index, "sample": r.sample, "setting": setting.name,
         "response": r.text, "num_tokens": r.num_tokens, "refusal": r.refusal}
        for r in responses
    ))
    refused = sum(r.refusal for r in responses)
    print(f"wrote {out}: {len(responses)} responses, {refused} judged refusals", file=sys.stderr)


def _run_label(args: argparse.Namespace) -> None:
    import dataclasses

    from dro_jax.anchors.labels import label_queries
    from dro_jax.common.files import check_writable, write_jsonl
    from dro_jax.data.queries import read_queries
    from dro_jax.inference.batched import Batching
    from dro_jax.inference.settings import SOFT_PREFIX, parse_prompt_setting
    from dro_jax.judging.judges import StringJudge
    from dro_jax.judging.responses import Measuring
    from dro_jax.loading import load_model

    out = check_writable(args.out)
    sampling, judge = sampling_config(args), StringJudge.load(args.refusal_phrases)
    specs = args.settings + [SOFT_PREFIX + path for path in args.soft_prompt]
    settings = [parse_prompt_setting(spec) for spec in specs]
    queries = read_queries(args.queries, args.field)
    check_judge_args(args)
    model = load_model(args.model, args.dtype, attention=args.attention)
    judge_model = model_judge(args, args.batch_size, policy=model)
    labels = label_queries(
        model, queries, settings, sampling, Measuring(args.num_samples, args.seed, judge), judge_model, args.queries, Batching(args.batch_size),
    )
    write_jsonl(out, (dataclasses.asdict(label) for label in labels))
    print(f"wrote {out}: {len(labels)} labels ({len(queries)} queries x {len(settings)} settings)", file=sys.stderr)
