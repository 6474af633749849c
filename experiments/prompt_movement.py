"""Experiment 1: do safety prompts move queries along the refusal direction or along the harmfulness direction?

The paper's main finding: human safety prompts push harmful and harmless
queries alike towards refusal, while leaving how harmful they look nearly
unchanged; DRO pushes the two sets apart along the refusal direction.

    python experiments/prompt_movement.py --run dro-run

Uses the run's anchor queries (every human prompt) and held-out queries
(also the DRO prompt); no model pass, seconds once the run exists.
"""

from __future__ import annotations

import numpy as np

from common import main_guard, parser, start, write_outputs
from dro_jax.evaluation.movement import Movement, movements, movements_markdown
from dro_jax.run.plots import movement_plot


def anchor_groups(run, values: np.ndarray) -> dict[tuple[str, str], np.ndarray]:
    """(setting, 'harmful train' | 'harmless train') -> the rows of `values` (per anchor input) in that group."""
    data = run.anchor_data
    settings = np.asarray(data.settings)
    return {
        (setting, f"{kind} train"): values[(settings == setting) & (data.harmless == flag)]
        for setting in dict.fromkeys(data.settings) for flag, kind in ((0, "harmful"), (1, "harmless"))
    }


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    run, out, began = start(args)
    data = run.anchor_data
    train: list[Movement] = movements(
        run.anchors, anchor_groups(run, run.anchors.leading(data.states)), anchor_groups(run, data.refusal_log_odds)
    )
    held_out = movements(run.anchors, run.held_out, run.held_out_log_odds)
    movement_plot(out / "prompt_movement.png", {"anchor (training) queries": train, "held-out queries": held_out},
                  f"{run.config.model}: how each prompt moves queries, against no prompt")
    write_outputs(
        out, "prompt_movement", f"Prompt movement along the refusal and harmfulness directions ({run.config.model})",
        f"python experiments/prompt_movement.py --run {args.run}", began,
        {"Anchor (training) queries": movements_markdown(train), "Held-out queries": movements_markdown(held_out)},
        {"anchor_queries": train, "held_out": held_out},
    )


if __name__ == "__main__":
    main_guard(main)
