"""The whole main job, cold and warm: each stage's seconds, XLA compiles and seconds spent compiling.

`dro-jax run` is short on an accelerator and its time can go to compiling
rather than computing. This runs the job twice in new run directories with
one new persistent compilation cache: first cold (the cache empty), then
warm (jax's in-memory caches dropped, the programs read from the cache, as a
second `dro-jax run` on the same machine gets them). Per stage it gives the
wall seconds, the executables built (compiled or read from the cache) and
the seconds they took, and their share of the stage. There is no PyTorch
baseline here: transformers has no such job (the per-pass benchmarks have
one). By default the job is `dro-jax run`'s shortened to one epoch and the
validation sets, where compiling weighs about as it does in the full job on
an accelerator; `--config` runs any run's configuration as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import jax

from dro_jax.common.compiles import use_compilation_cache
from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_text
from dro_jax.common.tables import markdown_table
from dro_jax.run.config import RunConfig
from dro_jax.run.pipeline import run_pipeline
from dro_jax.run.stages import StageRecords

STAGES = ("anchors", "train", "evaluate")


# The job measured when no --config is given: `dro-jax run`'s defaults, one epoch, the validation sets.
SHORTENED = {"epochs": 1, "harmful_test": "harmful_val", "harmless_test": "harmless_val"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a run's config.json (or `dro-jax run --show-config`'s output) to run "
                        "(default: dro-jax run's defaults shortened to one epoch and the validation sets)")
    parser.add_argument("--model", help="(default: the configuration's)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the configuration's)")
    parser.add_argument("--out", help="keep the two run directories and the cache here (default: a temporary directory)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to this JSON file")


def job_config(args: argparse.Namespace) -> RunConfig:
    """The configuration measured: --config's or the shortened default, with --model and --epochs on top."""
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise DroJaxError(f"{path}: no such configuration file")
        data = json.loads(path.read_text())
        config = RunConfig.from_dict(data["config"] if isinstance(data.get("config"), dict) else data)  # --show-config's or the run's
    else:
        config = RunConfig(**SHORTENED)
    given = {name: value for name, value in (("model", args.model), ("epochs", args.epochs)) if value is not None}
    return dataclasses.replace(config, **given)


@dataclasses.dataclass(frozen=True)
class StageFigures:
    seconds: float
    compiles: int
    compile_seconds: float

    @property
    def compiling_share(self) -> float:
        return self.compile_seconds / self.seconds if self.seconds else 0.0


def stage_figures(run_dir: Path) -> dict[str, StageFigures]:
    """Each stage's record in a finished run directory."""
    records = StageRecords(run_dir)
    figures = {}
    for name in STAGES:
        record = records.read(name) or {}
        figures[name] = StageFigures(record.get("seconds", 0.0), record.get("compiles", 0), record.get("compile_seconds", 0.0))
    return figures


def figures_table(runs: dict[str, dict[str, StageFigures]]) -> str:
    """One row per run and stage, then the run's total."""
    rows = []
    for label, stages in runs.items():
        total = StageFigures(*(round(sum(getattr(f, field.name) for f in stages.values()), 1) for field in dataclasses.fields(StageFigures)))
        for name, f in [*stages.items(), ("total", total)]:
            rows.append([label, name, f"{f.seconds:.1f}", str(f.compiles), f"{f.compile_seconds:.1f}", f"{f.compiling_share:.0%}"])
    return markdown_table(["run", "stage", "seconds", "XLA executables", "compile seconds", "of the stage"], rows)


def run(args: argparse.Namespace) -> None:
    config = job_config(args)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dro-jax-bench-run-"))
    if any((base / name).exists() for name in ("cold", "warm", "xla-cache")):
        raise DroJaxError(f"{base} holds an earlier benchmark (whose stages would be skipped, its cache warm): give a new --out")
    cache = use_compilation_cache(str(base / "xla-cache"))
    runs, walls = {}, {}
    for label in ("cold", "warm"):
        jax.clear_caches()  # the warm run finds its programs in the persistent cache only
        began = time.perf_counter()
        run_pipeline(config, base / label)
        walls[label] = time.perf_counter() - began
        runs[label] = stage_figures(base / label)
    print(f"\nmodel {config.model}, {config.epochs} epoch(s), evaluation on {config.harmful_test} + {config.harmless_test}, "
          f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; compilation cache {cache}\n")
    print(figures_table(runs))
    print("\n" + ", ".join(f"{label} run {seconds:.1f} s in all" for label, seconds in walls.items())
          + f"; the warm run takes {walls['warm'] / walls['cold']:.2f} of the cold one's time")
    if args.json:
        write_text(Path(args.json), json.dumps({
            "config": config.to_dict(), "devices": [str(d) for d in jax.devices()], "wall_seconds": walls,
            "runs": {label: {name: dataclasses.asdict(f) for name, f in stages.items()} for label, stages in runs.items()},
        }, indent=2))
