"""Evaluation sweeps: the evaluation engine (`dro_jax.evaluation.evaluate.SetMeasurer`) over every model x prompt
setting x query set, measured with the paper's refusal metric; rows are `EvalRow`s that name their model.

Per query N responses (greedy: one) are judged by the configured refusal
judge (the string judge by default). A harmless query counts against a prompt
if *any* of its responses refuses, a harmful one if *any* complies; both rates
are lower-is-better. The refusal log-odds (no generation) and the reply
quality (reply drift against the model's greedy replies with no prompt, reply
surprise and degenerate responses; see `dro_jax.evaluation.quality`) come with
every row.
With a judge model, the query sets named in the evaluation's `harmful_sets`
also get the paper's judged compliance beside the string judge's (see
`dro_jax.evaluation.measure`); by default those are the sets whose file name
starts with "harmful" (`harmful_by_name`).

A model that cannot be loaded, or a prompt that does not fit a model, gives
error rows instead of stopping the sweep. With several processes (see
`dro_jax.parallel.distributed`), each one evaluates an interleaved share of every
query set on its local devices and the responses are gathered, so every
process returns the whole table; or, on a mesh that spans the processes (for a
model too large for one host's devices), every process takes part in every
batch, each model's weights split over the whole job, as `run` and `evaluate`
do.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dro_jax.common.errors import DroJaxError
from dro_jax.evaluation.evaluate import EvalConfig, SetMeasurer
from dro_jax.evaluation.measure import harmful_set_flags
from dro_jax.evaluation.quality import ReplyReference
from dro_jax.evaluation.rows import EvalRow
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.inference.settings import NO_PROMPT, PromptSetting
from dro_jax.judging.judges import SafetyJudge
from dro_jax.judging.responses import Response
from dro_jax.loading import LoadedModel, load_model
from dro_jax.parallel.distributed import allgather_json, process_share, shows_progress
from dro_jax.parallel.mesh import process_count


def harmful_by_name(specs: Sequence[str]) -> tuple[str, ...]:
    """The default harmful sets of a sweep: those whose file name (or packaged name) starts with "harmful",
    e.g. harmful_test or data/harmful_advbench.csv, and not harmless_test."""
    return tuple(spec for spec in specs if Path(spec).name.lower().startswith("harmful"))


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """How every row is measured (`evaluation`, as `evaluate_settings` reads it: one decoding for every set, greedy
    by default, `num_samples` responses per query when sampling, the string judge, the scored openings, the
    degeneration rule, an adversarial suffix that rows name in `prompt`, and the sets that `judge_model` judges),
    and how each model is loaded (`dtype`, `attention`) and batched (`batch_size`)."""

    evaluation: EvalConfig = EvalConfig()
    batch_size: int = 32
    dtype: str = "float32"
    attention: str = "reference"  # see dro_jax.models.config.ATTENTION_IMPLEMENTATIONS
    judge_model: SafetyJudge | None = None

    def __post_init__(self) -> None:
        evaluation = self.evaluation
        if not isinstance(evaluation.sampling, SamplingConfig):
            raise DroJaxError("a sweep decodes every query set alike: give one SamplingConfig, not one per set")
        if evaluation.longest is not None:
            raise DroJaxError("a sweep judges every response: keeping the longest is for `evaluate_settings`")
        if evaluation.num_samples < 1:
            raise DroJaxError(f"num-samples must be at least 1, got {evaluation.num_samples}")
        if evaluation.sampling.is_greedy and evaluation.num_samples > 1:
            raise DroJaxError(f"greedy decoding gives one response per query; {evaluation.num_samples} samples need sampling")
        if self.batch_size < 1:
            raise DroJaxError(f"batch-size must be at least 1, got {self.batch_size}")

    def batching(self, mesh: Mesh | None) -> Batching:
        """Every pass of a row: `batch_size` rows at a time over `mesh`, without bars of its own (the sweep has one)."""
        return Batching(self.batch_size, mesh, progress=False)


def run_sweep(
    models: Sequence[str],
    prompts: Sequence[PromptSetting],
    datasets: Mapping[str, Sequence[str]],
    config: SweepConfig = SweepConfig(),
    mesh: Mesh | None = None,
    progress: bool = True,
) -> list[EvalRow]:
    """Rows for every model (name or path) x prompt x dataset, in that order; batches are split over `mesh`: this
    process's devices (each process then takes a share of the queries) or the whole job's."""
    if not models or not prompts or not datasets:
        raise DroJaxError("a sweep needs at least one model, one prompt setting and one query set")
    empty = [name for name, queries in datasets.items() if not queries]
    if empty:
        raise DroJaxError(f"{empty[0]}: the query set is empty")
    suffixes = {} if config.evaluation.suffix is None else config.evaluation.suffix.per_set(datasets)
    sets = {name: _Share(name, list(queries), suffixes.get(name), list(range(len(queries)))) for name, queries in datasets.items()}
    harmful = harmful_set_flags(list(datasets), config.evaluation.harmful_sets, None if config.judge_model is None else config.judge_model.name)
    rows = []
    total = len(models) * len(prompts) * len(datasets)
    with tqdm(total=total, desc="sweep", unit="row", disable=not shows_progress(progress) or jax.process_index() != 0) as bar:
        for spec in models:
            model, error = _load(spec, config, mesh)
            measurers: dict[str, SetMeasurer] = {}  # per dataset: this process's share of it, measured
            for setting in prompts:
                label = config.evaluation.label(setting)
                for name, whole in sets.items():
                    bar.set_postfix_str(f"{spec} | {label} | {name}", refresh=False)
                    if model is None:
                        rows.append(EvalRow(label, name, len(whole.queries), model=spec, error=error))
                    else:
                        judge_model = config.judge_model if harmful[name] else None
                        rows.append(_measure(model, spec, setting, whole, config, mesh, measurers, judge_model))
                    bar.update(1)
            del model, measurers  # free it (the measurers hold it too) before the next one loads
    return rows


def _load(spec: str, config: SweepConfig, mesh: Mesh | None) -> tuple[LoadedModel | None, str | None]:
    """The model with its parameters split over the mesh once, or None and why (if it failed on any process)."""
    try:
        model, error = load_model(spec, config.dtype, attention=config.attention, progress=False, mesh=mesh), None
    except (DroJaxError, OSError) as err:
        model, error = None, str(err)
    errors = [e for e in allgather_json(error) if e is not None]
    if errors:
        return None, errors[0]
    return model, None


@dataclasses.dataclass(frozen=True)
class _Share:
    """Queries of one set (all of them, or one process's share): their texts, suffixes (or None) and numbers in the set."""

    name: str
    queries: list[str]
    suffixes: list[str] | None
    numbers: list[int]

    def encode(self, model: LoadedModel, setting: PromptSetting) -> EncodedQueries:
        return encode_queries(model, self.queries, setting, self.name, self.suffixes)

    def part(self, positions: Sequence[int]) -> "_Share":
        """The queries at these positions of this share, with their suffixes and numbers."""
        pick = list(positions)
        return _Share(
            self.name, [self.queries[i] for i in pick], None if self.suffixes is None else [self.suffixes[i] for i in pick],
            [self.numbers[i] for i in pick],
        )


def _measure(
    model: LoadedModel, spec: str, setting: PromptSetting, whole: _Share, config: SweepConfig, mesh: Mesh | None,
    measurers: dict[str, SetMeasurer], judge_model: SafetyJudge | None,
) -> EvalRow:
    """Evaluates this process's share of the `whole` query set (`judge_model`, given for a harmful
    set, judging that share's responses), then builds the row from every process's share. The shares interleave
    (process i of n takes queries i, i + n, ...), so that each process gets queries of every kind and length and
    they finish together. On a mesh over several processes the share is every query, computed together."""
    whole_job = process_count(mesh) > 1
    name, queries, label = whole.name, whole.queries, config.evaluation.label(setting)
    share = whole if whole_job else whole.part(process_share(len(queries)))
    try:
        part = _share_part(model, setting, share, config, mesh, measurers, judge_model)
    except DroJaxError as err:
        where = f" (process {jax.process_index()}'s share of the queries)" if jax.process_count() > 1 and not whole_job else ""
        part = {"error": f"{err}{where}"}
    parts = [part] if whole_job else allgather_json(part)
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        return EvalRow(label, name, len(queries), model=spec, error=errors[0])

    def gathered(key: str) -> np.ndarray:
        return np.array([v for p in parts for v in p[key]], np.float64)

    responses = [Response(**{**r, "token_ids": tuple(r["token_ids"])}) for p in parts for r in p["responses"]]
    reference = ReplyReference([], gathered("reference_nll").reshape(-1, 2))
    return EvalRow.measured(
        label, name, len(queries), responses, gathered("log_odds"), reference.drift(gathered("reply_nll")),
        config.evaluation.degeneration, reply_surprise=reference.surprise(gathered("own_nll")), model=spec,
    )


def _share_part(
    model: LoadedModel, setting: PromptSetting, share: _Share, config: SweepConfig, mesh: Mesh | None,
    measurers: dict[str, SetMeasurer], judge_model: SafetyJudge | None,
) -> dict:
    """One process's part of a row as JSON-ready lists (empty when there are more processes than queries): its
    responses numbered in the whole set, refusal log-odds, the reference replies' NLL under this setting and under
    no prompt, and its own replies' NLL under no prompt. The share's reply reference is measured with its first
    setting."""
    if not share.queries:
        return {key: [] for key in ("responses", "log_odds", "reply_nll", "reference_nll", "own_nll")}
    if share.name not in measurers:
        measurers[share.name] = SetMeasurer(
            model, share.encode(model, NO_PROMPT), config.evaluation.sampling, config.evaluation, config.batching(mesh),
            share.numbers, judge_model,
        )
    measurer = measurers[share.name]
    measured, own = measurer.measure(None if setting.is_empty else share.encode(model, setting))
    return {
        "responses": [dataclasses.asdict(dataclasses.replace(r, query_index=share.numbers[r.query_index])) for r in measured.responses],
        "log_odds": measured.scores.log_odds.tolist(),
        "reply_nll": measured.reference_nll.tolist(),
        "reference_nll": measurer.reference.nll.tolist(),
        "own_nll": own.tolist(),
    }
