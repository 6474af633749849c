"""What the experiment scripts share: the run they build on, evaluating extra prompts against it, writing outputs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_text
from dro_jax.evaluation.rows import EvalRow, results_markdown
from dro_jax.evaluation.movement import Movement, movements, movements_markdown
from dro_jax.inference.settings import load_soft_prompt
from dro_jax.inference.settings import NO_PROMPT, PromptSetting
from dro_jax.loading import LoadedModel
from dro_jax.run.config import QuerySets
from dro_jax.run.outputs import RunOutputs
from dro_jax.run.pipeline import evaluate_prompts, finish_run


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", default="dro-run", help="a run directory of `dro-jax run` (any model; unfinished stages are run first)")
    parser.add_argument("--out", help="where the table, json and plot go (default: RUN/experiments)")
    return parser


def start(args: argparse.Namespace) -> tuple[RunOutputs, Path, float]:
    """The finished run, the output directory, and the start time."""
    began = time.monotonic()
    run = finish_run(args.run)
    out = Path(args.out) if args.out else run.paths.root / "experiments"
    out.mkdir(parents=True, exist_ok=True)
    return run, out, began


def evaluate_extra_prompts(model: LoadedModel, run: RunOutputs, prompts: dict[str, Path]) -> tuple[list[EvalRow], dict, dict]:
    """The run's held-out evaluation for extra soft prompts: rows, and held-out coordinates and log-odds as the run has them."""
    settings = [PromptSetting.soft(name, load_soft_prompt(path, model.config.hidden_size)) for name, path in prompts.items()]
    evaluation = evaluate_prompts(model, run.config, QuerySets.read(run.config), settings, run.anchors, run.references or None)
    return (evaluation.rows, {(o.setting, o.dataset): o.coords for o in evaluation.outcomes},
            {(o.setting, o.dataset): o.log_odds for o in evaluation.outcomes})


def comparison(run: RunOutputs, rows: list[EvalRow], coords: dict, log_odds: dict) -> tuple[list[EvalRow], list[Movement]]:
    """The run's rows and the extra ones per dataset (their shift against the run's no-prompt row), and every
    setting's movement against no prompt."""
    baseline = {r.dataset: r.compliance_logit for r in run.rows if r.setting == NO_PROMPT}
    rows = [dataclasses.replace(r, compliance_shift=r.compliance_logit - baseline[r.dataset])
            if r.dataset in baseline and r.compliance_logit is not None and baseline[r.dataset] is not None else r for r in rows]
    combined = [r for d in ("harmful", "harmless") for r in run.rows + rows if r.dataset == d]
    return combined, movements(run.anchors, {**run.held_out, **coords}, {**run.held_out_log_odds, **log_odds})


def write_outputs(out: Path, name: str, title: str, command: str, began: float, tables: dict[str, str], data: dict) -> None:
    minutes = (time.monotonic() - began) / 60
    body = [f"# {title}", "", f"Command: `{command}` ({minutes:.1f} min here)", ""]
    for heading, table in tables.items():
        body += [f"## {heading}", "", table, ""]
    body += [f"![{name}]({name}.png)", ""]
    write_text(out / f"{name}.md", "\n".join(body))
    write_text(out / f"{name}.json", json.dumps({**data, "minutes": round(minutes, 1)}, indent=2, default=_json_default))
    print("\n".join(body))
    print(f"wrote {out / name}.md/.json/.png", file=sys.stderr)


def _json_default(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(type(value))


def tables(rows: list[EvalRow], moved: list[Movement]) -> dict[str, str]:
    return {"Refusals on the held-out sets": results_markdown(rows), "Movement against no prompt": movements_markdown(moved)}


def wilson(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a share."""
    if total == 0:
        return float("nan"), float("nan")
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def main_guard(function) -> None:
    """Runs an experiment's main, turning user errors into one line and exit status 2."""
    try:
        function()
    except DroJaxError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
