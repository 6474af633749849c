"""The `run` command of `dro-jax`: the main job end to end (see `dro_jax.run.pipeline`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from dro_jax.cli.args import (
    add_field_arg, add_judge_args, add_mesh_args, add_model_args, add_openings_arg, add_phrases_arg, add_refusal_fit_arg,
    add_refusal_score_arg, non_negative_int, positive_int, start_job,
)
from dro_jax.dro.loss import LossWeights

DEFAULT_OUT = "dro-run"
# Command-line name -> RunConfig field; None means "the preset's value".
OVERRIDES = {
    "model": "model", "dtype": "dtype", "harmful": "harmful_train", "harmless": "harmless_train", "harmful_test": "harmful_test",
    "harmless_test": "harmless_test", "field": "field", "settings": "settings", "label": "label", "label_samples": "label_samples",
    "label_keep_longest": "label_keep_longest", "openings": "openings",
    "refusal_fit": "refusal_fit", "init_prompt": "init_prompt", "init_random": "init_random", "epochs": "epochs", "batch_size": "batch_size", "lr": "learning_rate",
    "seed": "seed", "loss_weights": "loss_weights", "refusal_score": "refusal_score", "eval_samples": "eval_samples",
    "max_new_tokens_harmful": "max_new_tokens_harmful", "max_new_tokens_harmless": "max_new_tokens_harmless",
    "min_new_tokens": "min_new_tokens", "trim_incomplete_lines": "trim_incomplete_lines", "refusal_phrases": "refusal_phrases",
    "remat": "remat", "microbatch": "microbatch", "judge_model": "judge_model",
    "judge_template": "judge_template",
}


def add_commands(commands) -> None:
    run = commands.add_parser(
        "run", help="the main job: anchor space, DRO training, evaluation of no prompt / the human prompts / DRO, report and plots",
        description="Runs every stage into one run directory. A stage whose inputs did not change is skipped; "
        "--resume continues a stopped run. The defaults are a quick configuration for CPUs; --paper uses the paper's.",
    )
    run.add_argument("--out", default=DEFAULT_OUT, help="run directory (default: %(default)s)")
    run.add_argument("--paper", action="store_true", help="the paper's protocol: 25 sampled labels per input, default-prompt init, "
                     "40 epochs at batch 50, lr 1e-3, 25 sampled test responses (20 longest by words judged), 10 to 300 (harmful) / "
                     "200 (harmless) new tokens, incomplete last lines trimmed, the paper's string judge; for accelerators")
    run.add_argument("--show-config", action="store_true", help="print the resolved configuration as JSON and exit (loads no model)")
    run.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    add_model_args(run, default=None)
    run.add_argument("--harmful", help="harmful anchor/training queries: a packaged set or a file (default: harmful_train)")
    run.add_argument("--harmless", help="harmless anchor/training queries, paired with the harmful ones (default: harmless_train)")
    run.add_argument("--harmful-test", help="held-out harmful queries (default: harmful_test)")
    run.add_argument("--harmless-test", help="held-out harmless queries (default: harmless_test)")
    add_field_arg(run)
    run.add_argument("--settings", nargs="+", help="human prompt settings for the anchor space and the comparison "
                     "(default: none default short mistral)")
    run.add_argument("--label", choices=("logodds", "sampled"), help="refusal label (default: logodds; --paper: sampled)")
    add_openings_arg(run)
    run.add_argument("--label-samples", type=positive_int, help="sampled responses per input for --label sampled (default: 5; --paper: 25)")
    run.add_argument("--label-keep-longest", type=positive_int, metavar="N",
                     help="judge only each input's N longest sampled responses, by words (default: all; --paper: 20)")
    add_refusal_fit_arg(run, None)
    init = run.add_mutually_exclusive_group()
    init.add_argument("--init-prompt", help="the human prompt the soft prompt starts from (default: short; --paper: default)")
    init.add_argument("--init-random", type=positive_int, metavar="N",
                      help="start from N random vocabulary embeddings instead (drawn with --seed; the shifts start from no prompt)")
    run.add_argument("--epochs", type=positive_int, help="(default: 8; --paper: 40)")
    run.add_argument("--batch-size", type=positive_int, help="(default: 25; --paper: 50)")
    run.add_argument("--lr", type=float, help="AdamW learning rate (default: 5e-3; --paper: 1e-3)")
    run.add_argument("--seed", type=int, help="data order, sampling (default: 42)")
    terms = LossWeights.terms()
    run.add_argument("--loss-weights", type=float, nargs=len(terms), metavar=tuple(t.upper() for t in terms),
                     help=f"weights of the {', '.join(terms)} terms (default: the preset's)")
    add_refusal_score_arg(run, None)
    run.add_argument("--eval-samples", type=int, help="sampled responses per test query, 0 = one greedy response (default: 0; --paper: 25)")
    run.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                     help="new tokens at most for both kinds of query (a per-kind option below wins)")
    run.add_argument("--max-new-tokens-harmful", type=positive_int, metavar="N",
                     help="new tokens at most, replies to harmful queries, in labels and evaluation (default: 64; --paper: 300)")
    run.add_argument("--max-new-tokens-harmless", type=positive_int, metavar="N",
                     help="the same for harmless queries (default: 64; --paper: 200)")
    run.add_argument("--min-new-tokens", type=non_negative_int, metavar="N", help="new tokens at least (default: 0; --paper: 10)")
    run.add_argument("--trim-incomplete-lines", action=argparse.BooleanOptionalAction, default=None,
                     help="drop last lines that do not end a sentence before judging (default: no; --paper: yes)")
    add_phrases_arg(run, None)
    run.add_argument("--remat", action="store_true", default=None, help="recompute activations in the backward pass (less memory)")
    add_judge_args(run, "a response to a harmful query (in the sampled label and the evaluation's harmful set)")
    add_mesh_args(run, training=True)
    run.set_defaults(run=_run)


def run_config(args: argparse.Namespace):
    """The RunConfig of the command line: the preset with every given option over it (a judge template file is
    read here, so that config.json holds the template's text)."""
    from dro_jax.judging.judges import read_judge_template
    from dro_jax.run.config import RunConfig

    both = {} if args.max_new_tokens is None else dict.fromkeys(("max_new_tokens_harmful", "max_new_tokens_harmless"), args.max_new_tokens)
    overrides = {**both, **{field: getattr(args, name) for name, field in OVERRIDES.items() if getattr(args, name) is not None}}
    for name in ("settings", "loss_weights"):
        if name in overrides:
            overrides[name] = tuple(overrides[name])
    if "judge_template" in overrides:
        overrides["judge_template"] = read_judge_template(overrides["judge_template"])
    return RunConfig.paper(**overrides) if args.paper else dataclasses.replace(RunConfig(), **overrides)


def _run(args: argparse.Namespace) -> None:
    from dro_jax.run.pipeline import run_pipeline

    config = run_config(args)
    if args.show_config:
        print(json.dumps(config.resolved(), indent=2))
        return
    mesh = start_job(args)
    try:
        results = run_pipeline(config, args.out, args.resume, mesh, args.attention, args.profile)
    except KeyboardInterrupt:
        print(f"stopped; `dro-jax run --out {args.out} --resume` (same options) continues", file=sys.stderr)
        raise
    if results is None:  # another process than 0: it wrote nothing
        return
    print(results.read_text(encoding="utf-8"))
    print(f"wrote {results.parent}: results.md/.csv/.json, plots, soft_prompt.safetensors", file=sys.stderr)
