"""The main job, `dro-jax run`: anchor space -> DRO training -> evaluation -> report, in one run directory.

Each stage is skipped when its record says it finished from the same inputs
(see `dro_jax.run.stages`); training continues from its last checkpoint with
`resume`. The model is loaded only if some stage has work to do. On a mesh
the weights are split over it and every stage's batches too; with several
processes all of them compute every stage and process 0 writes the files
(the others wait for them at a barrier after each stage).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from jax.sharding import Mesh

from dro_jax.anchors.collect import AnchorData, build_anchor_space
from dro_jax.anchors.space import AnchorSpace, save_anchor_space
from dro_jax.common.compiles import count_compiles
from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path
from dro_jax.common.run_directory import claim_run_directory
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.soft_prompt import initial_soft_prompt, random_soft_prompt
from dro_jax.dro.train import TrainingFiles, TrainResult, train_soft_prompt
from dro_jax.dro.training_set import dro_task
from dro_jax.evaluation.evaluate import Evaluation, evaluate_settings
from dro_jax.evaluation.quality import ReplyReference
from dro_jax.inference.batched import Batching
from dro_jax.inference.settings import PromptSetting, load_soft_prompt
from dro_jax.judging.judges import ModelJudge, SafetyJudge
from dro_jax.loading import LoadedModel, load_model, resolve_model_path
from dro_jax.parallel.distributed import barrier, is_writer, process_zero_decides
from dro_jax.parallel.mesh import data_mesh
from dro_jax.run.config import QuerySets, RunConfig
from dro_jax.run.outputs import RunOutputs, RunPaths, write_evaluation
from dro_jax.run.report import write_report
from dro_jax.run.stages import StageRecords, input_key

DRO_SETTING = "DRO"
# Settings added after runs were made: left out of a stage's inputs while unset, so that those runs keep their keys.
LATER_SETTINGS = ("init_random",)


def prepare_run_dir(config: RunConfig, root: str | Path, resume: bool) -> RunPaths:
    """Creates the run directory, or checks that an existing one holds this very configuration; with `resume`,
    the settings that only the evaluation reads may differ (the evaluation is then redone)."""
    def unfinished(directory: Path) -> str | None:
        stopped = StageRecords(directory).unfinished()
        return f"an unfinished run (stopped in: {', '.join(stopped)})" if stopped else None

    claim = functools.partial(claim_run_directory, root, config.to_dict(), resume, unfinished, evaluation_only_settings(config))
    return RunPaths(as_path(process_zero_decides(lambda: str(claim()))))


def stage_settings(config: RunConfig) -> dict[str, tuple[str, ...]]:
    """The RunConfig fields each stage reads, by stage name (the stages' records hash their values)."""
    generation = ("max_new_tokens_harmful", "max_new_tokens_harmless", "min_new_tokens", "trim_incomplete_lines", "refusal_phrases")
    judge = ("judge_model", "judge_template") if config.judge_model is not None else ()
    anchors = ("model", "dtype", "harmful_train", "harmless_train", "field", "settings", "label", "label_samples", "label_keep_longest", "openings",
               "num_components", "folds", "refusal_fit", "seed")
    if config.label == "sampled":
        anchors += generation + judge
    train = ("init_prompt", "init_random", "epochs", "batch_size", "learning_rate", "seed", "loss_weights", "refusal_score", "openings",
             "checkpoint_every", "remat")
    evaluate = ("harmful_test", "harmless_test", "eval_samples", "eval_keep_longest", "openings", "seed", *generation, *judge)
    return {"anchors": anchors, "train": train, "evaluate": evaluate}


def evaluation_only_settings(config: RunConfig) -> tuple[str, ...]:
    """The settings that neither the anchor stage nor training reads: `--resume` may change them."""
    earlier = {name for stage in ("anchors", "train") for name in stage_settings(config)[stage]}
    return tuple(f.name for f in dataclasses.fields(config) if f.name not in earlier)


def stage_inputs(config: RunConfig, sets: QuerySets) -> dict[str, dict]:
    """What each stage's record hashes: the values of the settings it reads (a query set by its content, the
    openings and refusal phrases by theirs, so that an edited file counts) and the key of the stage before it."""
    values = {**config.to_dict(), **sets.digests(), "openings": dataclasses.asdict(config.reply_openings()),
              "refusal_phrases": dataclasses.asdict(config.string_judge())}
    inputs, before = {}, None
    for stage, names in stage_settings(config).items():
        read = {name: values[name] for name in names if not (name in LATER_SETTINGS and values[name] is None)}
        inputs[stage] = {**({} if before is None else {"after": input_key(inputs[before])}), **read}
        before = stage
    return inputs


def _log(message: str) -> None:
    if is_writer():
        print(message, file=sys.stderr, flush=True)


def fit_summary(report: dict) -> str:
    """The anchor space's fit in a few lines: PCA explained variance, and each probe's accuracy, AUC and BCE."""
    def metric(value):
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"PCA explained variance: {', '.join(f'{v:.3f}' for v in report['explained_variance_ratio'])}"]
    for name in ("refusal", "harmfulness"):
        probe = report[name]
        lines.append(
            f"{name} probe ({probe.get('fit', 'logistic')}): accuracy {metric(probe['accuracy'])}, AUC {metric(probe['auc'])}, "
            f"BCE {metric(probe['bce'])}" + (f", R^2 {probe['r2']:.3f}" if "r2" in probe else "")
        )
    return "\n".join(lines)


def anchor_stage(
    model: LoadedModel,
    config: RunConfig,
    pairs: QueryPairs,
    out: Path,
    data_out: Path | None = None,
    mesh: Mesh | None = None,
    judge_model: SafetyJudge | None = None,
) -> tuple[AnchorSpace, AnchorData]:
    """Builds the anchor space of `pairs` as `config` says (a sampled label judged by its string judge and by
    `judge_model`, see `build_anchor_space`), writes it to `out` with its report beside it and, with `data_out`,
    the anchor inputs' rows there, and says how well it fits. The main job, `dro-jax anchor` and `dro-jax train`
    build it here."""
    batching = Batching(config.eval_batch_size, mesh)
    space, report, data = build_anchor_space(model, pairs, config.anchor_config(), config.string_judge(), judge_model, batching)
    if is_writer():
        if data_out is not None:
            data.save(data_out)
        save_anchor_space(space, report, out)
    _log(fit_summary(report))
    return space, data


def train_stage(
    model: LoadedModel,
    config: RunConfig,
    pairs: QueryPairs,
    anchors: AnchorSpace,
    target: TrainingFiles,
    resume: bool,
    mesh: Mesh | None = None,
    data: AnchorData | None = None,
) -> TrainResult:
    """Trains a DRO soft prompt on `pairs` and `anchors` as `config` says, into `target` (a run, `dro-jax train`'s
    directory, or an experiment's beside a run), with the base and reference states from the anchor stage's `data`
    where it covered them (the prompt is exported to `target.soft_prompt`)."""
    train = config.train_config()
    task = dro_task(model, pairs, anchors, starting_prompt(model, config), config.base_prompt, train, data, Batching(mesh=mesh))
    return train_soft_prompt(model, task, train, target, resume, mesh=mesh)


def starting_prompt(model: LoadedModel, config: RunConfig) -> np.ndarray:
    """The soft prompt's first values: `config.init_random` random vocabulary embeddings (drawn with its seed), else
    the init prompt's token embeddings."""
    if config.init_random:
        return random_soft_prompt(model.params, config.init_random, config.seed)
    return initial_soft_prompt(model.params, model.tokenizer, config.init_prompt)


def evaluate_prompts(
    model: LoadedModel,
    config: RunConfig,
    sets: QuerySets,
    settings: Sequence[PromptSetting],
    anchors: AnchorSpace,
    references: Mapping[str, ReplyReference] | None = None,
    mesh: Mesh | None = None,
    judge_model: SafetyJudge | None = None,
) -> Evaluation:
    """The run's held-out evaluation of `settings`: its decoding, openings and seed, batches over `mesh` (default:
    all devices on data); reply drift on `references` when given (a run's, so that added settings compare with its rows);
    `judge_model`, when given, judges the harmful set's responses."""
    return evaluate_settings(
        model, sets.test, settings, config.evaluation(), anchors, references, judge_model, Batching(config.eval_batch_size, mesh or data_mesh())
    )


def evaluate_stage(
    model: LoadedModel, config: RunConfig, sets: QuerySets, paths: RunPaths, mesh: Mesh | None = None, judge_model: SafetyJudge | None = None
) -> None:
    settings = [PromptSetting.from_text(name) for name in config.settings]
    settings.append(PromptSetting.soft(DRO_SETTING, load_soft_prompt(paths.soft_prompt, model.config.hidden_size)))
    evaluation = evaluate_prompts(model, config, sets, settings, AnchorSpace.load(paths.anchors), mesh=mesh, judge_model=judge_model)
    if is_writer():
        write_evaluation(paths, evaluation)


def load_judge(config: RunConfig, model: LoadedModel, attention: str = "reference", mesh: Mesh | None = None) -> ModelJudge | None:
    """The run's judge model (None without one), on the same mesh; `model` itself when the judge is the run's model."""
    if config.judge_model is None:
        return None
    return ModelJudge.load(config.judge_model, config.judge_template, config.dtype, attention, mesh, config.eval_batch_size, (config.model, model))


def finish_run(directory: str | Path) -> RunOutputs:
    """The outputs of the run in `directory`, after finishing any stage it still lacks (with its own config)."""
    paths = RunPaths(as_path(directory))
    if not paths.config.is_file():
        raise DroJaxError(f"{directory}: no run here; make one with `dro-jax run --out {directory}` (and --model/--paper as wanted)")
    config = RunConfig.from_dict(json.loads(paths.config.read_text()))
    run_pipeline(config, directory, resume=True)
    return RunOutputs.load(config, paths)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    outputs: list[Path]
    work: Callable[[LoadedModel], None]
    redo_on_resume: bool = False  # computed again under --resume when its inputs changed (its settings may change then)


def run_pipeline(
    config: RunConfig, out: str | Path, resume: bool = False, mesh: Mesh | None = None, attention: str = "reference",
    profile: Path | None = None,
) -> Path | None:
    """Runs (or continues) the main job in `out` on `mesh` (default: every device on data); returns the path of
    `results.md` (None on processes other than 0, which write nothing). With `profile`, a jax.profiler trace of a
    few training steps is written there.

    `mesh` and `attention` (how the model computes attention, see `load_model`)
    are not among the run's settings: they give the same results within float
    rounding, so a run may be continued with others."""
    sets = QuerySets.read(config)  # every input is read and checked before anything is written
    for spec in filter(None, (config.model, config.judge_model)):
        resolve_model_path(spec)
    paths = dataclasses.replace(prepare_run_dir(config, out, resume), profile=profile)
    records = StageRecords(paths.root)
    inputs = stage_inputs(config, sets)
    model = functools.cache(lambda: load_model(config.model, config.dtype, attention=attention, mesh=mesh))
    judge = functools.cache(lambda: load_judge(config, model(), attention, mesh))
    stages = [
        Stage("anchors", "anchor space (representations, refusal labels, PCA, probes)",
              [paths.anchors, paths.anchor_report, paths.anchor_data],
              lambda m: anchor_stage(m, config, sets.train, paths.anchors, paths.anchor_data, mesh, judge() if config.judges_labels else None)),
        Stage("train", "DRO training", [paths.soft_prompt, paths.metrics],
              lambda m: train_stage(m, config, sets.train, AnchorSpace.load(paths.anchors), paths, resume, mesh, AnchorData.load(paths.anchor_data))),
        Stage("evaluate", "evaluation on the held-out sets", [paths.evaluation, paths.responses],
              lambda m: evaluate_stage(m, config, sets, paths, mesh, judge()), redo_on_resume=True),
    ]
    for number, stage in enumerate(stages, start=1):
        key = input_key(inputs[stage.name])
        done = process_zero_decides(lambda: records.is_done(stage.name, key, stage.outputs))  # before process 0 writes
        if done:
            _log(f"[{number}/{len(stages) + 1}] {stage.title}: done earlier with the same inputs, skipped")
            continue
        _log(f"[{number}/{len(stages) + 1}] {stage.title}")
        started = records.start(stage.name, key, redo=resume and stage.redo_on_resume) if is_writer() else None
        with count_compiles() as compiles:
            stage.work(model())
        if is_writer():
            records.finish(stage.name, key, started, compiles)
        barrier(f"stage {stage.name} written")
    _log(f"[{len(stages) + 1}/{len(stages) + 1}] report and plots")
    return write_report(RunOutputs.load(config, paths), records) if is_writer() else None
