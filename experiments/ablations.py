"""Experiment 3: the paper's ablations of the DRO loss (no norm term, no refusal term, no harmfulness term).

Each ablation retrains the soft prompt with one of the run's weighted terms set to zero,
everything else as in the run (same anchor space, init, schedule, seed), and
is evaluated on the held-out sets next to the full DRO prompt.

    python experiments/ablations.py --run dro-run [--terms norm replies]

Trains into RUN/experiments/ablations/no_TERM (kept and resumable: a re-run only evaluates).
"""

from __future__ import annotations

import dataclasses

from common import comparison, evaluate_extra_prompts, main_guard, parser, start, tables, write_outputs
from dro_jax.dro.loss import LossWeights
from dro_jax.dro.train import TrainingFiles
from dro_jax.loading import load_model
from dro_jax.run.config import QuerySets
from dro_jax.run.pipeline import train_stage
from dro_jax.run.plots import refusal_plot


def main() -> None:
    arguments = parser(__doc__.splitlines()[0])
    arguments.add_argument("--terms", nargs="+", choices=LossWeights.terms(), help="the terms to ablate (default: every term the run weights)")
    args = arguments.parse_args()
    run, out, began = start(args)
    config = run.config
    full = LossWeights.from_sequence(config.loss_weights)
    weighted = [t for t in LossWeights.terms() if getattr(full, t) > 0]  # a term the run does not use has nothing to ablate
    if args.terms and set(args.terms) - set(weighted):
        arguments.error(f"the run does not weight {', '.join(sorted(set(args.terms) - set(weighted)))}: nothing to ablate")
    model = load_model(config.model, config.dtype)
    sets = QuerySets.read(config)
    prompts = {}
    for term in args.terms or weighted:
        weights = full.ablate(term).as_tuple()
        target = TrainingFiles(out / "ablations" / f"no_{term}")
        if not target.soft_prompt.exists():
            ablated = dataclasses.replace(config, loss_weights=weights)
            print(f"ablation: DRO without the {term} term (weights {list(weights)})")
            train_stage(model, ablated, sets.train, run.anchors, target, resume=True, data=run.anchor_data)
        prompts[f"DRO without {term}"] = target.soft_prompt
    rows, coords, log_odds = evaluate_extra_prompts(model, run, prompts)
    rows, moved = comparison(run, rows, coords, log_odds)
    refusal_plot(out / "ablations.png", rows, f"{config.model}: DRO and its ablations")
    write_outputs(
        out, "ablations", f"Ablations of the DRO loss ({config.model})", f"python experiments/ablations.py --run {args.run}",
        began, tables(rows, moved), {"rows": rows, "movement": moved},
    )


if __name__ == "__main__":
    main_guard(main)
