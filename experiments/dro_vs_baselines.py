"""Experiment 2: DRO against the human safety prompts and against vanilla prompt tuning, on held-out queries.

Vanilla prompt tuning trains the same soft prompt (same init) on sampled
responses to the training queries: likelihood of the wanted ones (refusals
of harmful queries, compliant answers to harmless ones), unlikelihood of the
unwanted ones. On a run made with `dro-jax run --paper` (or with --paper
here) it is the reference's baseline (`PromptTuningConfig.reference`: the
20 longest of 25 responses per query, no-prompt negatives, token-level
means, the reference's unlikelihood weight for the model); otherwise the
quick one (2 responses per query, cut to 64 tokens). --epochs, --samples and
--response-tokens override either.

    python experiments/dro_vs_baselines.py --run dro-run

Trains the baseline into RUN/experiments/prompt_tuning (kept: a re-run only evaluates),
then evaluates it as the run evaluated its prompts.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from common import comparison, evaluate_extra_prompts, main_guard, parser, start, tables, write_outputs
from dro_jax.dro.prompt_tuning import PromptTuningConfig, prepare_response_set, prompt_tuning_objective
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.task import TrainingTask
from dro_jax.dro.train import TrainingFiles, train_soft_prompt
from dro_jax.loading import load_model
from dro_jax.run.config import QuerySets, RunConfig
from dro_jax.run.plots import refusal_plot

BASELINE = "prompt tuning"
# The quick baseline's responses are shorter than the reference's 100 tokens: training them is the slow part on CPUs.
QUICK = PromptTuningConfig(max_response_tokens=64)
# This script's option -> PromptTuningConfig field.
OPTIONS = {"epochs": "epochs", "samples": "responses", "response_tokens": "max_response_tokens"}


def is_paper_run(config: RunConfig) -> bool:
    """Whether a run was made with `dro-jax run --paper`: its config holds the paper preset's value of every
    setting that preset changes (a run that overrode one of them is not taken for one; pass --paper)."""
    paper, quick = RunConfig.paper(), RunConfig()
    changed = [f.name for f in dataclasses.fields(RunConfig) if getattr(paper, f.name) != getattr(quick, f.name)]
    return all(getattr(config, name) == getattr(paper, name) for name in changed)


def baseline_config(args: argparse.Namespace, config: RunConfig) -> PromptTuningConfig:
    """The reference's baseline for a paper run (or with --paper), the quick one otherwise, with this script's options on top."""
    given = {field: getattr(args, name) for name, field in OPTIONS.items() if getattr(args, name) is not None}
    if args.paper or is_paper_run(config):
        return PromptTuningConfig.reference(config.model, **given)
    return dataclasses.replace(QUICK, **given)


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--paper", action="store_true", help="the reference's baseline even if the run is not a --paper run")
    arguments.add_argument("--epochs", type=int, help="baseline epochs (default: 5, the paper's)")
    arguments.add_argument("--samples", type=int, help="responses per training query (default: 2; paper: 20, the longest of 25)")
    arguments.add_argument("--response-tokens", type=int, help="responses are cut to this many tokens (default: 64; paper: 100)")
    args = arguments.parse_args()
    run, out, began = start(args)
    config = run.config
    settings = baseline_config(args, config)
    print(f"prompt-tuning baseline: {settings.describe()}", file=sys.stderr)
    model = load_model(config.model, config.dtype)
    files = TrainingFiles(out / "prompt_tuning")
    if not files.soft_prompt.exists():
        initial = initial_soft_prompt(model.params, model.tokenizer, config.init_prompt)
        data = prepare_response_set(model, QuerySets.read(config).train, config.init_prompt, len(initial), settings, config.seed)
        task = TrainingTask(initial, data, prompt_tuning_objective(model.config, settings, config.remat, config.microbatch))
        train_soft_prompt(model, task, config.train_config(epochs=settings.epochs), files, resume=True)
    rows, coords, log_odds = evaluate_extra_prompts(model, run, {BASELINE: files.soft_prompt})
    rows, moved = comparison(run, rows, coords, log_odds)
    refusal_plot(out / "dro_vs_baselines.png", rows, f"{config.model}: human prompts, DRO and vanilla prompt tuning")
    options = " ".join(f"--{name.replace('_', '-')} {getattr(args, name)}" for name in OPTIONS if getattr(args, name) is not None)
    write_outputs(
        out, "dro_vs_baselines", f"DRO against human prompts and vanilla prompt tuning ({config.model})",
        f"python experiments/dro_vs_baselines.py --run {args.run}{' --paper' * args.paper} {options}".rstrip(), began,
        tables(rows, moved), {"rows": rows, "movement": moved, "baseline": settings.describe()},
    )


if __name__ == "__main__":
    main_guard(main)
