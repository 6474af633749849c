"""Training a soft prompt: the jitted optax step and the loop with checkpoints, for any `Objective`.

Only the soft prompt is an argument of `jax.grad`; the model's parameters
enter as frozen inputs, so no weight gradient is ever formed and nothing of
the model is copied per step. On a mesh (`dro_jax.parallel.mesh`) the batch
is split over the batch axes, the weights as `dro_jax.models.partitioning`
says, and the soft prompt and optimizer state (float32) are replicated. With
several processes, each fills its own devices' part of the batch, they all
take part in every checkpoint, and only process 0 writes the other files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from dro_jax.anchors.space import AnchorSpace
from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import write_jsonl
from dro_jax.common.paths import AnyPath, as_path
from dro_jax.dro.checkpoints import TrainCheckpoints
from dro_jax.dro.loss import Frozen, LossWeights, Objective, check_refusal_score, dro_objective
from dro_jax.dro.microbatch import check_microbatch
from dro_jax.dro.task import TrainingTask
from dro_jax.inference.refusal_score import OpeningReadout, Openings
from dro_jax.inference.settings import save_soft_prompt
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import SharedPrefix
from dro_jax.models.partitioning import place_params
from dro_jax.parallel.chips import bfloat16_peak_tflops
from dro_jax.parallel.distributed import is_writer, process_zero_decides, shows_progress
from dro_jax.parallel.mesh import batch_devices, data_mesh
from dro_jax.parallel.preemption import Stopped, steps_may_finish, stop_requested
from dro_jax.parallel.sharding import on_mesh, padded_batch_size, replicate, replicated, shard_batch, to_host, tree_to_host


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The reference's settings by default: AdamW 1e-3 (weight decay 0.01), clip 1.0, batch 50, 40 epochs, seed 42,
    the paper's loss (`refusal_score` "probe", see `dro_jax.dro.loss.REFUSAL_SCORES`); `openings` are the reply
    openings the behavioural refusal scores read. `microbatch` (rows through the model at a time) and `remat`
    trade time for memory and leave the updates as they are, so a resumed run may change them."""

    epochs: int = 40
    batch_size: int = 50
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    seed: int = 42
    loss_weights: LossWeights = LossWeights()
    refusal_score: str = "probe"
    openings: Openings = Openings()
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    remat: bool = False
    microbatch: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "checkpoint_every", "keep_checkpoints", "microbatch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise DroJaxError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise DroJaxError(f"the learning rate must be positive, got {self.learning_rate}")
        check_refusal_score(self.refusal_score)

    def dro_objective(self, model_config: ModelConfig) -> Objective:
        """DRO with these loss weights, refusal score, remat and microbatch size."""
        return dro_objective(model_config, self.loss_weights, self.remat, self.refusal_score, self.microbatch)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EXECUTION_ONLY = ("microbatch", "remat")  # TrainConfig fields that change memory and time, never the result


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def batch_indices(num_examples: int, config: TrainConfig, step: int) -> np.ndarray:
    """The example indices of a global step: a fresh permutation per epoch, fixed by (seed, epoch)."""
    per_epoch = steps_per_epoch(num_examples, config.batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(num_examples)
    return order[position * config.batch_size : (position + 1) * config.batch_size]


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(config.clip_norm), optax.adamw(config.learning_rate, weight_decay=config.weight_decay))


def make_train_step(
    loss_fn: Callable, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> Callable:
    """jit(soft_prompt, opt_state, batch, frozen) -> (soft_prompt, opt_state, metrics); state replicated.
    Call (and lower) it inside `on_mesh(mesh)`, which puts the model's activation constraints in."""
    def step(soft_prompt, opt_state, batch, frozen):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(soft_prompt, batch, frozen)
        updates, opt_state = optimizer.update(grads, opt_state, soft_prompt)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return optax.apply_updates(soft_prompt, updates), opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=replicated(mesh))


def frozen_inputs(
    model: LoadedModel, anchors: AnchorSpace | None, prefix: SharedPrefix | None, openings: Openings = Openings()
) -> Frozen:
    """The loss's fixed inputs: the parameters, the training inputs' shared prefix, the anchor space (none
    for the prompt-tuning baseline) and the reply openings as the refusal scores read them."""
    prefix = None if prefix is None else jax.device_put(prefix)
    if anchors is None:
        return Frozen(model.params, prefix, None, None, None, None)
    readout = jax.device_put(jax.tree.map(np.asarray, OpeningReadout.of(model.tokenizer, openings, model.config.vocab_size)))
    return Frozen(
        model.params, prefix, *jax.device_put((anchors.mean, anchors.components, anchors.refusal.weight, anchors.harmfulness.weight)),
        readout,
    )


def place_frozen(frozen: Frozen, config: ModelConfig, mesh: jax.sharding.Mesh) -> Frozen:
    """The loss's fixed inputs on the mesh: the weights split by their partition rules, the rest replicated."""
    return replicate(frozen._replace(params=None), mesh)._replace(params=place_params(frozen.params, config, mesh))


def model_fingerprint(model: LoadedModel) -> dict:
    """What a checkpoint must match: sizes, tokenizer, and the input-embedding table the prompt lives in."""
    vocab = json.dumps(sorted(model.tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return {
        "hidden_size": model.config.hidden_size,
        "vocab_size": model.config.vocab_size,
        "num_layers": model.config.num_layers,
        "tokenizer_sha256": hashlib.sha256(vocab).hexdigest(),
        "embeddings_checksum": "".join(f"{lane:08x}" for lane in to_host(table_checksum(model.params["embed_tokens"]["weight"]))),
    }


_CHECKSUM_SALTS = (0x9E3779B9, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)


@jax.jit
def table_checksum(table: jax.Array) -> jax.Array:
    """Four uint32 lanes, each the sum modulo 2**32 of every entry's float32 bits times a weight drawn from its
    index. Integer sums do not depend on their order, so the checksum is the same on any mesh, and where the table
    is split each device sums its own part: nothing the size of the table is gathered or copied to the host."""
    bits = jax.lax.bitcast_convert_type(table.astype(jnp.float32), jnp.uint32)
    index = jnp.arange(table.shape[0], dtype=jnp.uint32)[:, None] * jnp.uint32(table.shape[1]) + jnp.arange(table.shape[1], dtype=jnp.uint32)
    lanes = []
    for salt in _CHECKSUM_SALTS:
        weight = (index ^ jnp.uint32(salt)) * jnp.uint32(0x2C1B3C6D) | jnp.uint32(1)  # odd: no entry's bits are lost
        lanes.append(jnp.sum(bits * weight, dtype=jnp.uint32))
    return jnp.stack(lanes)


@dataclasses.dataclass
class TrainResult:
    soft_prompt: np.ndarray
    steps: int
    metrics: list[dict]
    objective: Objective  # what was minimised (its `shown` metrics name the ones worth printing)


def _check_resumable(record: dict, fingerprint: dict, config: TrainConfig, directory: Path) -> None:
    if record.get("model") != fingerprint:
        theirs, ours = record.get("model", {}), fingerprint
        differ = [key for key in ours if theirs.get(key) != ours[key]]
        raise DroJaxError(
            f"{directory}: the checkpoint belongs to another model ({', '.join(differ)} differ: "
            f"{', '.join(f'{k} {theirs.get(k)} vs {ours[k]}' for k in differ if not k.endswith('sha256')) or 'same sizes'}); "
            "use a new output directory"
        )
    saved = record.get("config", {})
    changed = sorted(
        k for k, v in config.to_dict().items() if k not in EXECUTION_ONLY and json.loads(json.dumps(v)) != saved.get(k)
    )
    if changed:
        raise DroJaxError(f"{directory}: the checkpoint was made with different settings ({', '.join(changed)}); resume with the same ones")


@dataclasses.dataclass(frozen=True)
class TrainingFiles:
    """Where a training run keeps its state: checkpoints/, metrics.jsonl and the exported soft prompt; and, with
    `profile`, where a jax.profiler trace of a few of its steps goes (`StepTrace`)."""

    root: AnyPath  # a local directory or one in an object store (gs://...)
    profile: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", as_path(self.root))

    checkpoints = property(lambda self: self.root / "checkpoints")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    soft_prompt = property(lambda self: self.root / "soft_prompt.safetensors")


class StepTrace:
    """A jax.profiler trace of `steps` training steps into `directory` (None: no trace), from the second step this
    run takes (the first compiles); with several processes, each writes its own `process_N` folder there."""

    def __init__(self, directory: Path | None, start: int, total: int, steps: int = 3):
        first = start + 1 if total - start > 1 else start
        self.window = range(first, min(first + steps, total)) if directory is not None else range(0)
        if directory is not None and jax.process_count() > 1:
            directory = directory / f"process_{jax.process_index()}"
        self.directory, self.running = directory, False

    def before(self, step: int) -> None:
        if self.window and step == self.window.start:
            jax.profiler.start_trace(str(self.directory))
            self.running = True

    def after(self, step: int) -> None:
        """Called once the step's results are on the host, so the trace holds all of its device work."""
        if self.running and step + 1 == self.window.stop:
            self.stop()

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False


def train_soft_prompt(
    model: LoadedModel,
    task: TrainingTask,
    config: TrainConfig,
    files: TrainingFiles,
    resume: bool = False,
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
) -> TrainResult:
    """Runs (or resumes) `task` into `files`: checkpoints every `checkpoint_every` steps and at the end, the
    metrics of every step, and the trained prompt written in the paper's format beside them. A task without an
    objective trains `config.dro_objective`.

    NaN or inf in the loss or gradient stops training with an error; the
    last good checkpoint stays on disk.
    """
    mesh = mesh or data_mesh()
    rows = padded_batch_size(config.batch_size, mesh)
    check_microbatch(config.microbatch, rows, batch_devices(mesh))
    fingerprint = model_fingerprint(model)
    checkpoints = TrainCheckpoints(files.checkpoints, config.keep_checkpoints)
    optimizer = make_optimizer(config)
    data = task.data
    objective = task.objective or config.dro_objective(model.config)
    step_fn = make_train_step(objective.loss, optimizer, mesh)
    soft_prompt = jax.device_put(np.asarray(task.initial, np.float32))
    # (one compiled program for the optimizer's zeros, not one per eager array it makes)
    soft_prompt, opt_state = replicate((soft_prompt, jax.jit(optimizer.init)(soft_prompt)), mesh)  # restored into this placement
    start, history = 0, []
    latest = process_zero_decides(checkpoints.latest_step)  # which state to resume from is one decision for all hosts
    if latest is not None:
        if not resume:
            raise DroJaxError(f"{checkpoints.directory} already holds checkpoints: pass --resume to continue, or use a new output directory")
        saved_record = checkpoints.record(latest)  # orbax reads it on every process together
        process_zero_decides(lambda: _check_resumable(saved_record, fingerprint, config, checkpoints.directory))
        (soft_prompt, opt_state), record = checkpoints.restore((soft_prompt, opt_state), latest)
        start = record["step"]
        history = process_zero_decides(lambda: _read_history(files.metrics, start))
    saved = start  # the last step checkpointed, kept here rather than read back from storage
    unplaced = frozen_inputs(model, task.anchors, data.prefix, config.openings)
    frozen = place_frozen(unplaced, model.config, mesh)
    counted = unplaced._replace(params=None, prefix=data.prefix)  # the host prefix: counting FLOPs reads nothing back per step
    peak = bfloat16_peak_tflops(np.dtype(model.params["embed_tokens"]["weight"].dtype).name)
    total = config.epochs * steps_per_epoch(len(data), config.batch_size)

    def save(step: int) -> None:
        nonlocal saved
        record = {
            "step": step, "epoch": step // steps_per_epoch(len(data), config.batch_size), "seed": config.seed,
            "config": config.to_dict(), "model": fingerprint, "num_examples": len(data),
        }
        if is_writer():  # first: a resume drops lines beyond its checkpoint, never misses one
            write_jsonl(files.metrics, history)
        checkpoints.save(step, (soft_prompt, opt_state), record)
        saved = step

    bar = tqdm(total=total, initial=start, desc=objective.name, unit="step", disable=not shows_progress(progress))
    trace = StepTrace(files.profile, start, total)
    with bar, steps_may_finish():
        try:
            for step in range(start, total):
                trace.before(step)
                index = batch_indices(len(data), config, step)
                weights = np.zeros(rows, np.float32)
                weights[: len(index)] = 1
                padded = np.concatenate([index, np.full(rows - len(index), index[0])])
                began = time.perf_counter()
                host_batch = data.rows(padded, weights)
                batch = shard_batch(host_batch, mesh)
                with on_mesh(mesh):
                    new_prompt, new_state, metrics = step_fn(soft_prompt, opt_state, batch, frozen)
                metrics = {k: float(v) for k, v in tree_to_host(metrics).items()}
                seconds = time.perf_counter() - began  # the first step's includes compiling it
                trace.after(step)
                throughput = step_throughput(seconds, host_batch, objective.step_flops(host_batch, counted), peak)
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    raise DroJaxError(
                        f"the loss or its gradient became {metrics['loss']} / {metrics['grad_norm']} at step {step + 1}; "
                        f"stopped; the last good checkpoint is step {saved} in {checkpoints.directory}"
                        if saved else f"the loss became non-finite at step {step + 1}; stopped before any checkpoint"
                    )
                soft_prompt, opt_state = new_prompt, new_state
                history.append({"step": step + 1, **metrics, **throughput})
                bar.set_postfix({**{k: f"{metrics[k]:.4g}" for k in objective.shown if k in metrics}, **shown_throughput(throughput)})
                bar.update(1)
                if (step + 1) % config.checkpoint_every == 0 or step + 1 == total:
                    save(step + 1)
                signum = stop_requested(step + 1)  # asked on any process: every process stops after the same step
                if signum is not None:
                    raise Stopped(signum)
        except KeyboardInterrupt:  # Stopped too: the state between two steps is consistent, keep it
            done = history[-1]["step"] if history else 0
            if done > saved:
                save(done)
            raise
        finally:
            trace.stop()
            checkpoints.close()
    result = TrainResult(to_host(soft_prompt), total, history, objective)
    if is_writer():
        save_soft_prompt(files.soft_prompt, result.soft_prompt, {"model": model.source, "steps": str(total)})
    return result


def step_throughput(seconds: float, batch, flops: float, peak_tflops: float | None) -> dict[str, float]:
    """A step's figures for `metrics.jsonl`: its seconds, the real rows' own tokens per second, the model's
    TFLOP/s (`Objective.step_flops`) and, where the chip's bfloat16 peak is known (`dro_jax.parallel.chips`), the
    model FLOP utilisation (`mfu`, a fraction of that peak)."""
    tokens = int((np.asarray(batch.attention_mask) * (np.asarray(batch.weights) > 0)[:, None]).sum())
    figures = {"step_seconds": seconds, "tokens_per_second": tokens / seconds, "model_tflop_per_second": flops / seconds / 1e12}
    if peak_tflops is not None:
        figures["mfu"] = figures["model_tflop_per_second"] / peak_tflops
    return figures


def shown_throughput(figures: dict[str, float]) -> dict[str, str]:
    """The progress bar's part of `step_throughput`: tokens/s, and the utilisation where known, else TFLOP/s."""
    rate = {"MFU": f"{figures['mfu']:.0%}"} if "mfu" in figures else {"TFLOP/s": f"{figures['model_tflop_per_second']:.3g}"}
    return {"tok/s": f"{figures['tokens_per_second']:.0f}", **rate}


def _read_history(metrics_path: Path, last_step: int) -> list[dict]:
    """The metrics lines of the steps up to `last_step` (a resume drops those beyond its checkpoint)."""
    if not metrics_path.exists():
        return []
    history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    return [record for record in history if record["step"] <= last_step]
