"""DRO training-step time: the jitted dro-jax step vs the same step in PyTorch/transformers, with forward-only rows.

Both sides run one batch of the packaged training queries (`harmful_train` and
`harmless_train`, drawn as the training loop draws its first batch and padded
to the training set's single length), the soft prompt initialised from the
short safety prompt, on the device JAX uses and in one dtype (see
`dro_jax.bench.device`: bfloat16 on accelerators, float32 on CPUs):

* dro-jax: `make_train_step` (value_and_grad of `dro_loss`, optax clip 1.0 +
  AdamW 1e-3) under `jax.jit`, as `train_soft_prompt` runs it;
* PyTorch: `dro_jax.parity.torch_dro.torch_train_step` (the same loss through
  transformers' `inputs_embeds`, backward, clip_grad_norm_ 1.0, AdamW 1e-3),
  model parameters frozen.

Forward-only rows time the loss alone (no gradient). The dro-jax rows run for
each refusal score in `--refusal-scores` (the paper's `probe`, and the
behavioural `head` and `openings`, see `dro_jax.dro.loss.REFUSAL_SCORES`) with
the preservation term weighted `--preserve`; PyTorch runs the paper's loss.
The anchor space is a
cheap stand-in, fine for timing: PCA of the batch's base states (4 axes,
completed to a full basis) and random probe weights; the loss's cost does not
depend on the probe values.

Work counts, as `forward` does, the matmul FLOPs of the real (unpadded)
tokens each side computes plus causal attention: dro-jax runs the prefix the
inputs share once and each row's own part, PyTorch each whole input. A
training step counts 2 forward passes (the backward pass forms input gradients
only, no weight gradients: about one forward's matmuls), a forward-only call 1.
Times are medians of the calls. Memory is the process's
resident-set high-water mark (Linux VmHWM, reset through
/proc/self/clear_refs after each warm-up, so each row's peak covers its timed
calls only; freed heap memory is first handed back with glibc's malloc_trim,
so a row cannot silently reuse what an earlier row left resident), given as
the peak over the RSS when the row started (its working memory) and as the
absolute peak (the JAX rows run before the PyTorch model is loaded). Where
the peak cannot be reset, the never-reset ru_maxrss is shown instead and
says so. XLA device memory statistics, where the backend has them (not on
CPU), are printed as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import time
from pathlib import Path

import numpy as np

from dro_jax.bench.device import DTYPES, bench_device
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import QueryPairs, read_queries
from dro_jax.inference.batched import Batching
from dro_jax.loading import load_model
from dro_jax.parity.torch_models import import_torch, load_torch_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=50, help="queries per step (default: %(default)s, the reference's)")
    parser.add_argument("--num-queries", type=int, default=100, help="harmful/harmless training pairs to draw the batch from (default: all 100)")
    parser.add_argument("--init-prompt", default="short", help="safety prompt the soft prompt starts from (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row after one warm-up step (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads (XLA uses every core)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random probe weights")
    parser.add_argument("--refusal-scores", nargs="+", default=["probe", "head", "openings"],
                        help="dro-jax rows, one per refusal score (default: %(default)s)")
    parser.add_argument("--preserve", type=float, default=1.0, help="weight of the preservation term in the dro-jax rows (default: %(default)s)")
    parser.add_argument("--replies", type=float, default=0.0,
                        help="weight of the replies term in the dro-jax rows: the harmless rows' no-prompt replies teacher-forced, one "
                        "more pass over query + reply per step (default: %(default)s, off)")
    parser.add_argument("--dtype", choices=DTYPES, help="both sides' dtype (default: bfloat16 on accelerators, float32 on CPUs)")
    parser.add_argument("--openings", default=None, help="the openings of the `openings` score: apologies, declines, decline-replies or "
                        "a JSON file (default: apologies)")


class PeakMemory:
    """Resident-set high-water mark of this process, resettable on Linux."""

    STATUS = Path("/proc/self/status")
    CLEAR = Path("/proc/self/clear_refs")

    def __init__(self) -> None:
        self.resettable = self._try_reset()

    def _try_reset(self) -> bool:
        try:
            self.CLEAR.write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
            return self._status("VmHWM") is not None
        except OSError:
            return False

    def _status(self, field: str) -> int | None:
        try:
            for line in self.STATUS.read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def current(self) -> int:
        return self._status("VmRSS") or 0

    def start(self) -> int:
        """Returns freed heap memory to the system, resets the peak (where possible); returns the RSS now.

        Without the trim, memory an earlier row freed stays resident and a
        later row reuses it unseen: its peak over start would read near zero.
        """
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc only
        except (OSError, AttributeError):
            pass
        if self.resettable:
            self._try_reset()
        return self.current()

    def peak(self) -> int:
        if self.resettable:
            return self._status("VmHWM") or 0
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux

    @property
    def kind(self) -> str:
        return "VmHWM, reset per row" if self.resettable else "ru_maxrss, never reset: includes every earlier row"


def whole_inputs_batch(batch, prefix):
    """The batch as a plain implementation runs it: every whole input (prefix and own part) left-padded to the
    longest, with no shared part (a `QueryBatch` without prefix, for the PyTorch side)."""
    from dro_jax.inference.padding import left_pad
    from dro_jax.parity.torch_dro import whole_sequences

    token_ids, mask, offsets = whole_sequences(batch, prefix)
    keep = mask.astype(bool)
    sequences = [list(ids[real]) for ids, real in zip(token_ids, keep)]
    starts = [int(offset - np.sum(~real[:offset])) for offset, real in zip(offsets, keep)]
    ids, mask, offsets = left_pad(sequences, max(map(len, sequences)), 0, starts if offsets.min() >= 0 else None)
    return batch._replace(token_ids=ids, attention_mask=mask, soft_offsets=offsets)


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> None:
    torch = import_torch(args.threads)
    import jax
    import jax.numpy as jnp

    from dro_jax.anchors.space import AnchorSpace, LinearProbe, complete_basis, fit_pca
    from dro_jax.common.errors import DroJaxError
    from dro_jax.dro.loss import LossWeights, check_refusal_score, dro_objective
    from dro_jax.inference.refusal_score import Openings
    from dro_jax.dro.soft_prompt import initial_soft_prompt
    from dro_jax.dro.train import TrainConfig, batch_indices, frozen_inputs, make_optimizer, make_train_step, place_frozen
    from dro_jax.dro.training_set import REPLY_TOKENS, prepare_training_set
    from dro_jax.parallel.mesh import data_mesh
    from dro_jax.parallel.sharding import on_mesh, padded_batch_size, replicate, shard_batch
    from dro_jax.parity.torch_dro import freeze, make_torch_optimizer, torch_anchors, torch_dro_loss, torch_train_step

    if args.steps < 1 or args.batch_size < 1:
        raise DroJaxError("--steps and --batch-size must be at least 1")
    for score in args.refusal_scores:
        check_refusal_score(score)
    pairs = QueryPairs(read_queries("harmful_train")[: args.num_queries], read_queries("harmless_train")[: args.num_queries])
    device = bench_device(torch, args.dtype)
    model = load_model(args.model, device.dtype, progress=False)
    config = model.config
    init = initial_soft_prompt(model.params, model.tokenizer, args.init_prompt)
    openings = Openings.load(args.openings)
    reply_tokens = REPLY_TOKENS if args.replies else 0
    data = prepare_training_set(model, pairs, args.init_prompt, init.shape[0], openings, reply_tokens, batching=Batching(progress=False))
    train_config = TrainConfig(batch_size=min(args.batch_size, len(data)))
    mesh = data_mesh()
    index = batch_indices(len(data), train_config, 0)
    rows = padded_batch_size(len(index), mesh)
    weights = np.zeros(rows, np.float32)
    weights[: len(index)] = 1
    batch = data.rows(np.concatenate([index, np.full(rows - len(index), index[0])]), weights)

    # Cheap anchor space for timing: PCA axes of the batch's base states, random probes.
    num_components = min(4, len(index), config.hidden_size)
    mean, components, _ = fit_pca(batch.base_states[: len(index)], num_components, args.seed)
    rng = np.random.default_rng(args.seed)
    anchors = AnchorSpace(
        mean, complete_basis(components, args.seed), num_components,
        LinearProbe(rng.standard_normal(num_components).astype(np.float32), 0.0),
        LinearProbe(rng.standard_normal(num_components).astype(np.float32), 0.0), {"benchmark": "PCA + random probes"},
    )

    shared = 0 if data.prefix is None else len(data.prefix.tokens)
    real = shared + batch.attention_mask[: len(index)].sum(axis=1).astype(np.int64)  # whole inputs
    forward_flops = config.pass_flops(real)
    print(f"model {model.source}: {config.num_parameters / 1e6:.1f}M parameters; {device.describe()}; soft prompt {init.shape[0]} "
          f"rows (float32) from the {args.init_prompt!r} prompt")
    print(f"batch {len(index)} of {len(data)} training queries: {real.sum()} real tokens; dro-jax runs their shared prefix of {shared} tokens once and each row's own part "
          f"(padded to {batch.token_ids.shape[1]}), PyTorch each whole input (padded to the batch's longest); "
          f"XLA sees {os.cpu_count()} cores, PyTorch {args.threads} threads")

    memory = PeakMemory()
    results: dict[str, dict] = {}

    def measure(name: str, warm_up, call) -> None:
        start = time.perf_counter()
        warm_up()
        first = time.perf_counter() - start
        base = memory.start()
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        results[name] = {"first": first, "times": times, "start_rss": base, "peak_rss": memory.peak()}

    # dro-jax: the training loop's own jitted step, state replicated and batch sharded as there, per refusal score.
    optimizer = make_optimizer(train_config)
    unplaced = frozen_inputs(model, anchors, data.prefix, openings)
    frozen = place_frozen(unplaced, config, mesh)
    jax_batch = shard_batch(batch, mesh)
    weights = dataclasses.replace(LossWeights(), preserve=args.preserve, replies=args.replies)
    jax_metrics, step_flops = {}, {}
    for score in args.refusal_scores:
        objective = dro_objective(config, weights, refusal_score=score)
        step_flops[score] = objective.step_flops(batch, unplaced)  # the training loop's own count
        loss_fn = objective.loss
        step_fn = make_train_step(loss_fn, optimizer, mesh)
        state = {"prompt": replicate(jnp.asarray(init), mesh)}
        state["opt"] = replicate(optimizer.init(state["prompt"]), mesh)

        def jax_step():
            with on_mesh(mesh):
                state["prompt"], state["opt"], metrics = step_fn(state["prompt"], state["opt"], jax_batch, frozen)
            jax.block_until_ready(state["prompt"])
            jax_metrics.setdefault(score, {k: float(v) for k, v in metrics.items()})

        measure(f"jax_step:{score}", jax_step, jax_step)
        jax_loss = jax.jit(loss_fn)
        prompt_now = jnp.asarray(init)
        forward_once = lambda: jax.block_until_ready(jax_loss(prompt_now, jax_batch, frozen))
        measure(f"jax_forward:{score}", forward_once, forward_once)
    device_stats = jax.devices()[0].memory_stats()

    # PyTorch: the same step on the transformers model, each whole input left-padded to the batch's longest.
    torch_batch = whole_inputs_batch(batch, data.prefix)
    torch_model = freeze(load_torch_model(model.source, torch, device.dtype, device.torch_device))
    t_anchors = torch_anchors(anchors, device=torch_model.device)
    soft = torch.nn.Parameter(torch.from_numpy(init.copy()).to(torch_model.device))
    torch_optimizer = make_torch_optimizer(soft, train_config.learning_rate, train_config.weight_decay)
    torch_metrics = {}

    def torch_step():
        metrics = torch_train_step(torch_model, soft, torch_optimizer, torch_batch, t_anchors, clip_norm=train_config.clip_norm)
        torch_metrics.setdefault("probe", metrics)

    measure("torch_step", torch_step, torch_step)
    fixed = torch.from_numpy(init.copy()).to(torch_model.device)

    def torch_forward():
        with torch.no_grad():
            torch_dro_loss(torch_model, fixed, torch_batch, t_anchors)
        device.synchronize(torch)

    measure("torch_forward", torch_forward, torch_forward)

    peak = device.peak_gflops
    table = []

    labels = {
        "torch_step": ("PyTorch training step, paper's loss", 2 * forward_flops,
                       f"transformers {torch_model.config._attn_implementation} attention; backward + clip_grad_norm_ + AdamW"),
        "torch_forward": ("PyTorch loss, forward only", forward_flops, "torch.no_grad"),
    }
    for score in args.refusal_scores:
        weighted = f"refusal score {score}, preserve weight {args.preserve:g}" + (f", replies weight {args.replies:g}" if args.replies else "")
        labels[f"jax_step:{score}"] = (f"dro-jax training step, {weighted}", step_flops[score], "jit; value_and_grad + optax clip/AdamW")
        labels[f"jax_forward:{score}"] = (f"dro-jax loss, forward only, {weighted}", step_flops[score] / 2, "jit")
    median = {key: statistics.median(result["times"]) for key, result in results.items()}
    order = [f"jax_step:{s}" for s in args.refusal_scores] + ["torch_step"] + [f"jax_forward:{s}" for s in args.refusal_scores] + ["torch_forward"]
    for key in order:
        label, work, note = labels[key]
        result, seconds = results[key], median[key]
        gflops = work / seconds / 1e9
        table.append([
            label, f"{seconds:.2f}", f"{min(result['times']):.2f}", f"{work / 1e9:.0f}", f"{gflops:.0f}", f"{gflops / peak:.0%}",
            _gib(max(result["peak_rss"] - result["start_rss"], 0)), _gib(result["peak_rss"]), note,
        ])
    print(f"matmul peak ({device.limits_from}): {peak:.0f} GFLOP/s; memory: process RSS peak ({memory.kind})\n")
    print(markdown_table(
        ["implementation", f"median s ({args.steps} calls)", "best s", "work (GFLOP)", "GFLOP/s", "of peak", "peak RSS over start",
         "peak RSS", "note"], table
    ))
    print()
    for score in args.refusal_scores:
        step, forward = median[f"jax_step:{score}"], median[f"jax_forward:{score}"]
        print(f"refusal score {score}: dro-jax compile (first call minus the median) training step "
              f"{max(results[f'jax_step:{score}']['first'] - step, 0):.1f} s, forward only {max(results[f'jax_forward:{score}']['first'] - forward, 0):.1f} s; "
              f"PyTorch's paper step / this step: {median['torch_step'] / step:.2f}x, forward only {median['torch_forward'] / forward:.2f}x (medians)")
    if "probe" in jax_metrics:
        first_jax, first_torch = jax_metrics["probe"], torch_metrics["probe"]
        gradients = (f"gradient norm {first_jax['grad_norm']:.6f} (dro-jax) vs {first_torch['grad_norm']:.6f} (PyTorch); "
                     if args.preserve == args.replies == 0 else "")  # with a weighted preservation term the dro-jax gradient has more parts
        paper_terms = first_jax["loss"] - args.preserve * first_jax["preserve"] - args.replies * first_jax["replies"]
        print(f"first step, refusal score probe, same inputs: {gradients}the paper's terms {paper_terms:.6f} vs {first_torch['loss']:.6f} "
              f"(at the initial prompt new = base, so about 1.01 ln 2)")
    if device_stats:
        print(f"XLA device memory: peak {_gib(device_stats.get('peak_bytes_in_use', 0))} in use")
