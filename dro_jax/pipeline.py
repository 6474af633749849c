"""The main job, `dro-jax run`: anchor space -> DRO training -> evaluation -> report, in one run directory.

Each stage is skipped when its record says it finished from the same inputs
(see `dro_jax.stages`); training continues from its last checkpoint with
`resume`. The model is loaded only if some stage has work to do.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from dro_jax.anchor_data import AnchorConfig, AnchorData, collect_anchor_data
from dro_jax.anchors import AnchorSpace, FitConfig, fit_anchor_space
from dro_jax.chat import PromptSetting
from dro_jax.dro_loss import LossWeights
from dro_jax.errors import DroJaxError
from dro_jax.evaluate import Evaluation, EvalRow, evaluate_settings
from dro_jax.files import atomic_output
from dro_jax.generate import SamplingConfig
from dro_jax.loading import LoadedModel, load_model
from dro_jax.queries import check_query_sets, read_queries
from dro_jax.refusal_score import Openings
from dro_jax.report import write_report
from dro_jax.run_config import RunConfig
from dro_jax.sharding import data_mesh
from dro_jax.soft_prompt import initial_soft_prompt, load_soft_prompt, save_soft_prompt
from dro_jax.stages import StageRecords, input_key, text_digest
from dro_jax.train import TrainConfig, prepare_training_set, train_soft_prompt

DRO_SETTING = "DRO"
EVAL_SAMPLING = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9, top_k=50)


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Where each output of a run lives."""

    root: Path

    config = property(lambda self: self.root / "config.json")
    anchors = property(lambda self: self.root / "anchors.safetensors")
    anchor_report = property(lambda self: self.root / "anchors.report.json")
    anchor_data = property(lambda self: self.root / "anchor_data.npz")
    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    soft_prompt = property(lambda self: self.root / "soft_prompt.safetensors")
    evaluation = property(lambda self: self.root / "evaluation.json")
    responses = property(lambda self: self.root / "responses.jsonl")


@dataclasses.dataclass(frozen=True)
class QuerySets:
    harmful_train: list[str]
    harmless_train: list[str]
    harmful_test: list[str]
    harmless_test: list[str]

    @classmethod
    def read(cls, config: RunConfig) -> "QuerySets":
        sets = cls(*(read_queries(getattr(config, name), config.field) for name in
                     ("harmful_train", "harmless_train", "harmful_test", "harmless_test")))
        check_query_sets(sets.harmful_train, sets.harmless_train)
        for name in ("harmful_test", "harmless_test"):
            if not getattr(sets, name):
                raise DroJaxError(f"{getattr(config, name)}: the {name.replace('_', ' ')} set is empty")
        return sets

    def digests(self) -> dict[str, str]:
        return {name: text_digest(value) for name, value in dataclasses.asdict(self).items()}


def prepare_run_dir(config: RunConfig, root: str | Path, resume: bool) -> RunPaths:
    """Creates the run directory, or checks that an existing one holds this very configuration."""
    paths = RunPaths(Path(root))
    wanted = config.to_dict()
    if paths.config.exists():
        saved = json.loads(paths.config.read_text())
        changed = sorted(k for k in set(wanted) | set(saved) if saved.get(k) != wanted.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
            raise DroJaxError(
                f"{paths.root} holds a run with other settings ({shown}{', ...' if len(changed) > 4 else ''}); "
                f"rerun with the same settings, or start fresh with a new --out (or delete {paths.root})"
            )
        unfinished = StageRecords(paths.root).unfinished()
        if unfinished and not resume:
            raise DroJaxError(
                f"{paths.root} holds an unfinished run (stopped in: {', '.join(unfinished)}); "
                "pass --resume to continue it, or choose a new --out"
            )
        return paths
    try:
        paths.root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DroJaxError(f"{paths.root}: cannot create the run directory ({err.strerror})") from None
    with atomic_output(paths.config) as tmp:
        tmp.write_text(json.dumps(wanted, indent=2))
    return paths


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _save_anchor_data(path: Path, data: AnchorData) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, states=data.states, compliance=data.compliance, refusal_log_odds=data.refusal_log_odds,
                     harmless=data.harmless, settings=np.array(data.settings))


def load_anchor_data(path: Path) -> AnchorData:
    with np.load(path) as saved:
        return AnchorData(saved["states"], saved["compliance"], saved["refusal_log_odds"], saved["harmless"], list(saved["settings"]))


def run_openings(config: RunConfig) -> Openings:
    return Openings.from_file(config.openings) if config.openings else Openings()


def anchor_stage(model: LoadedModel, config: RunConfig, sets: QuerySets, paths: RunPaths) -> None:
    anchor_config = AnchorConfig(
        settings=config.settings, label=config.label, num_samples=config.label_samples, seed=config.seed,
        fit=FitConfig(num_components=config.num_components, folds=config.folds, seed=42), openings=run_openings(config),
    )
    data = collect_anchor_data(model, sets.harmful_train, sets.harmless_train, anchor_config, config.eval_batch_size)
    metadata = {"model": model.source, "settings": list(config.settings), "num_harmful": len(sets.harmful_train),
                "num_harmless": len(sets.harmless_train)}
    space, report = fit_anchor_space(data.states, data.compliance, data.harmless, anchor_config.fit, config.label, metadata)
    _save_anchor_data(paths.anchor_data, data)
    with atomic_output(paths.anchor_report) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    space.save(paths.anchors)


def train_stage(model: LoadedModel, config: RunConfig, sets: QuerySets, source: RunPaths, target: RunPaths, resume: bool) -> Path:
    """Trains the soft prompt on the anchor space of `source` into `target` (the same run, or e.g. an ablation's
    directory beside it); returns the exported prompt."""
    data = load_anchor_data(source.anchor_data)
    rows = [i for i, name in enumerate(data.settings) if name == config.init_prompt]
    base_states = data.states[rows] if rows else None  # reuse the anchor stage's pass when it covered the init prompt
    initial = initial_soft_prompt(model.params, model.tokenizer, config.init_prompt)
    training_set = prepare_training_set(
        model, sets.harmful_train, sets.harmless_train, config.init_prompt, len(initial), base_states=base_states
    )
    train_config = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate, seed=config.seed,
        loss_weights=LossWeights(*config.loss_weights), checkpoint_every=config.checkpoint_every, remat=config.remat,
    )
    result = train_soft_prompt(
        model, training_set, AnchorSpace.load(source.anchors), initial, train_config, target.checkpoints, target.metrics, resume=resume
    )
    return save_soft_prompt(target.soft_prompt, result.soft_prompt, {"model": model.source, "steps": str(result.steps)})


def evaluate_stage(model: LoadedModel, config: RunConfig, sets: QuerySets, paths: RunPaths) -> None:
    settings = [PromptSetting.from_text(name) for name in config.settings]
    settings.append(PromptSetting.soft(DRO_SETTING, load_soft_prompt(paths.soft_prompt, model.config.hidden_size)))
    greedy = config.eval_samples == 0
    sampling = dataclasses.replace(SamplingConfig() if greedy else EVAL_SAMPLING, max_new_tokens=config.max_new_tokens)
    evaluation = evaluate_settings(
        model, {"harmful": sets.harmful_test, "harmless": sets.harmless_test}, settings, AnchorSpace.load(paths.anchors),
        sampling, 1 if greedy else config.eval_samples, config.eval_keep_longest, config.seed, config.eval_batch_size,
        openings=run_openings(config), mesh=data_mesh(),
    )
    with atomic_output(paths.responses) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            for outcome in evaluation.outcomes:
                for response in outcome.responses:
                    handle.write(json.dumps({"setting": outcome.setting, "dataset": outcome.dataset, **dataclasses.asdict(response)}) + "\n")
    with atomic_output(paths.evaluation) as tmp:
        tmp.write_text(json.dumps(evaluation_to_json(evaluation)))


def evaluation_to_json(evaluation: Evaluation) -> dict:
    return {
        "rows": [dataclasses.asdict(row) for row in evaluation.rows],
        "outcomes": [
            {"setting": o.setting, "dataset": o.dataset, "log_odds": o.log_odds.tolist(),
             "coords": None if o.coords is None else o.coords.tolist()}
            for o in evaluation.outcomes
        ],
    }


@dataclasses.dataclass(frozen=True, eq=False)
class RunOutputs:
    """What the stages of a finished run left on disk, loaded."""

    config: RunConfig
    paths: RunPaths
    anchors: AnchorSpace
    anchor_data: AnchorData
    rows: list[EvalRow]
    held_out: dict[tuple[str, str], np.ndarray]  # (setting, dataset) -> anchor coordinates of the held-out queries
    held_out_log_odds: dict[tuple[str, str], np.ndarray]  # (setting, dataset) -> their refusal log-odds
    metrics: list[dict]

    @classmethod
    def load(cls, config: RunConfig, paths: RunPaths) -> "RunOutputs":
        evaluation = json.loads(paths.evaluation.read_text())
        return cls(
            config, paths, AnchorSpace.load(paths.anchors), load_anchor_data(paths.anchor_data),
            [EvalRow(**row) for row in evaluation["rows"]],
            {(o["setting"], o["dataset"]): np.asarray(o["coords"], np.float32) for o in evaluation["outcomes"]},
            {(o["setting"], o["dataset"]): np.asarray(o["log_odds"]) for o in evaluation["outcomes"]},
            [json.loads(line) for line in paths.metrics.read_text().splitlines() if line.strip()],
        )


def finish_run(directory: str | Path) -> RunOutputs:
    """The outputs of the run in `directory`, after finishing any stage it still lacks (with its own config)."""
    paths = RunPaths(Path(directory))
    if not paths.config.is_file():
        raise DroJaxError(f"{directory}: no run here; make one with `dro-jax run --out {directory}` (and --model/--paper as wanted)")
    config = RunConfig.from_dict(json.loads(paths.config.read_text()))
    run_pipeline(config, directory, resume=True)
    return RunOutputs.load(config, paths)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    inputs: dict
    outputs: list[Path]
    work: Callable[[LoadedModel], None]


def run_pipeline(config: RunConfig, out: str | Path, resume: bool = False) -> Path:
    """Runs (or continues) the main job in `out`; returns the path of `results.md`."""
    paths = prepare_run_dir(config, out, resume)
    sets = QuerySets.read(config)
    digests = sets.digests()
    records = StageRecords(paths.root)
    settings = {**config.to_dict(), "openings": dataclasses.asdict(run_openings(config))}
    model_inputs = {k: settings[k] for k in ("model", "dtype")}
    anchor_inputs = {**model_inputs, "harmful": digests["harmful_train"], "harmless": digests["harmless_train"],
                     **{k: settings[k] for k in ("field", "settings", "label", "label_samples", "openings", "num_components", "folds", "seed")}}
    anchor_key = input_key(anchor_inputs)
    train_inputs = {"anchors": anchor_key, **{k: settings[k] for k in (
        "init_prompt", "epochs", "batch_size", "learning_rate", "seed", "loss_weights", "checkpoint_every", "remat")}}
    train_key = input_key(train_inputs)
    eval_inputs = {"trained": train_key, "harmful": digests["harmful_test"], "harmless": digests["harmless_test"],
                   **{k: settings[k] for k in ("eval_samples", "eval_keep_longest", "max_new_tokens", "openings", "seed")}}
    stages = [
        Stage("anchors", "anchor space (representations, refusal labels, PCA, probes)", anchor_inputs,
              [paths.anchors, paths.anchor_report, paths.anchor_data], lambda m: anchor_stage(m, config, sets, paths)),
        Stage("train", "DRO training", train_inputs, [paths.soft_prompt, paths.metrics],
              lambda m: train_stage(m, config, sets, paths, paths, resume)),
        Stage("evaluate", "evaluation on the held-out sets", eval_inputs, [paths.evaluation, paths.responses],
              lambda m: evaluate_stage(m, config, sets, paths)),
    ]
    model = functools.cache(lambda: load_model(config.model, config.dtype))
    for number, stage in enumerate(stages, start=1):
        key = input_key(stage.inputs)
        if records.is_done(stage.name, key, stage.outputs):
            _log(f"[{number}/{len(stages) + 1}] {stage.title}: done earlier with the same inputs, skipped")
            continue
        _log(f"[{number}/{len(stages) + 1}] {stage.title}")
        started = records.start(stage.name, key)
        stage.work(model())
        records.finish(stage.name, key, started)
    _log(f"[{len(stages) + 1}/{len(stages) + 1}] report and plots")
    return write_report(RunOutputs.load(config, paths), records)
