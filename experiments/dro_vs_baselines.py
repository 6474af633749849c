"""Experiment 2: DRO against the human safety prompts and against vanilla prompt tuning, on held-out queries.

Vanilla prompt tuning trains the same soft prompt (same init) on sampled
responses to the training queries: likelihood of the wanted ones (refusals
of harmful queries, compliant answers to harmless ones), unlikelihood of the
unwanted ones, responses cut to --response-tokens.

    python experiments/dro_vs_baselines.py --run dro-run

Trains the baseline into RUN/experiments/prompt_tuning (kept: a re-run only evaluates),
then evaluates it as the run evaluated its prompts.
"""

from __future__ import annotations

from common import comparison, evaluate_extra_prompts, main_guard, parser, start, tables, write_outputs
from dro_jax.dro.prompt_tuning import prepare_response_set, prompt_tuning_objective
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.train import TrainingFiles, train_and_export
from dro_jax.loading import load_model
from dro_jax.run.config import QuerySets
from dro_jax.run.plots import refusal_plot

BASELINE = "prompt tuning"


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--epochs", type=int, default=5, help="baseline epochs (default: %(default)s, the paper's)")
    arguments.add_argument("--samples", type=int, default=2, help="sampled responses per training query (default: %(default)s)")
    arguments.add_argument("--response-tokens", type=int, default=64, help="responses are cut to this many tokens (default: %(default)s)")
    args = arguments.parse_args()
    run, out, began = start(args)
    config = run.config
    model = load_model(config.model, config.dtype)
    files = TrainingFiles(out / "prompt_tuning")
    if not files.soft_prompt.exists():
        initial = initial_soft_prompt(model.params, model.tokenizer, config.init_prompt)
        data = prepare_response_set(model, QuerySets.read(config).train, config.init_prompt, len(initial),
                                    args.samples, args.response_tokens, config.seed)
        train_and_export(model, data, None, initial, config.train_config(epochs=args.epochs), files, resume=True,
                         objective=prompt_tuning_objective(model.config, config.remat))
    rows, coords, log_odds = evaluate_extra_prompts(model, run, {BASELINE: files.soft_prompt})
    rows, moved = comparison(run, rows, coords, log_odds)
    refusal_plot(out / "dro_vs_baselines.png", rows, f"{config.model}: human prompts, DRO and vanilla prompt tuning")
    write_outputs(
        out, "dro_vs_baselines", f"DRO against human prompts and vanilla prompt tuning ({config.model})",
        f"python experiments/dro_vs_baselines.py --run {args.run} --epochs {args.epochs} --samples {args.samples} "
        f"--response-tokens {args.response_tokens}", began, tables(rows, moved), {"rows": rows, "movement": moved},
    )


if __name__ == "__main__":
    main_guard(main)
