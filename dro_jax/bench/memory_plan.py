"""Per-device memory of the DRO train step and of generation on a mesh, from XLA's compiled programs: does a model fit?

Nothing is allocated and no checkpoint is read: every argument is a
`jax.ShapeDtypeStruct` carrying the sharding training or generation gives it
(`dro_jax.dro.train`, `dro_jax.inference.generate`), and the step is only
lowered and compiled (`jit(...).lower(...).compile()`) inside `on_mesh`, so
the model's activation constraints are in it as in a real run. XLA's buffer
assignment then says, per device, how many bytes the arguments, the outputs
and the temporaries (every live intermediate at the peak of its schedule)
take; donated inputs that become outputs (the soft prompt and optimizer
state) count once. The total is compared with the per-chip budget.

The devices are simulated CPU devices, so the command compiles in a child
process started with `--xla_force_host_platform_device_count`: the device
count of a jax process is fixed when its backend starts, which may already
have happened in the caller. XLA's CPU backend partitions, schedules and
assigns buffers like the accelerator backends, but it fuses differently and
its schedule is not theirs, so read the numbers as a close estimate of an
accelerator's, not a byte-exact one; the argument bytes are exact. Where the
CPU backend alone would widen narrow floats to float32 (whole float32 copies
of the weights), the child steers round it: bfloat16 is compiled as float16,
of the same width, and two CPU-only passes are off (`COMPILED_AS`,
`CPU_ONLY_PASSES`).

The train step is the paper's (refusal score `probe`): a batch of rows of
`--tokens` own tokens each after a shared prefix of `--prefix-tokens` that
holds the soft prompt, as `dro_jax.dro.training_set` lays real training out;
the frozen weights in `--dtype`, split by `dro_jax.models.partitioning`, and
the anchors, soft prompt and AdamW state (float32) replicated. Generation is
greedy decoding of `--max-new-tokens` after prompts of `--tokens` own tokens
behind the same prefix, padded as evaluation pads it (to a multiple of 128
tokens, `PREFIX_BUCKET`), the KV cache inside the program.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dro_jax.common.errors import DroJaxError
from dro_jax.common.tables import markdown_table
from dro_jax.models.config import ModelConfig

GIB = 2**30
STEPS = ("train", "generate")
DTYPE_NAMES = ("bfloat16", "float32")
# XLA:CPU has no bfloat16 arithmetic: its float normalization gives every bfloat16 op float32 operands, and the
# conversion of each whole stacked weight then leaves the layer loop (loop-invariant code motion), so a bfloat16
# program compiled for CPU holds a float32 copy of every weight and of the KV cache, which no GPU or TPU program
# does (Llama-2 7B on one device: generation 76.5 GiB in bfloat16 against 28.4 GiB in float16; the train step
# with remat and microbatch 10, 39.5 against 14.3 GiB). float16 has the same width and is native there, so the
# program is compiled in float16 where bfloat16 is asked for.
COMPILED_AS = {"bfloat16": "float16", "float32": "float32"}
# Two more XLA:CPU passes give matmuls float32 operands that GPU (Volta on) and TPU programs keep narrow:
# `change-op-data-type` turns each float16 matmul into a float32 one, and `operand_upcaster` widens the operands
# of a mixed-precision matmul (float16 in, float32 out, as the LM head's `preferred_element_type`) to its output
# type; XLA:GPU filters its own operand upcaster off matrix multiplications. Each leaves float32 copies of
# weights (a layer's at a time, 0.4 GiB for 7B), and the CPU dot emitter takes the narrow operands as they are, so
# the child compiles without them.
CPU_ONLY_PASSES = ("change-op-data-type", "operand_upcaster")
NUM_COMPONENTS = 4  # the anchor space's leading PCA axes, AnchorConfig's default

# Built-in shapes: Llama-2's published configurations (config.json of meta-llama/Llama-2-*-hf), and a tiny one
# for tests. Their parameter counts are printed with every plan, so they can be checked against 6.74e9 / 13.0e9 / 69.0e9.
SHAPES: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig("llama", 32000, 4096, 11008, 32, 32, 32, 128, rms_norm_eps=1e-5),
    "llama2-13b": ModelConfig("llama", 32000, 5120, 13824, 40, 40, 40, 128, rms_norm_eps=1e-5),
    "llama2-70b": ModelConfig("llama", 32000, 8192, 28672, 80, 64, 8, 128, rms_norm_eps=1e-5),
    "tiny": ModelConfig("llama", 512, 64, 256, 2, 4, 4, 16, max_position_embeddings=1024),
}


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """One configuration to compile: a model shape on `devices` simulated chips laid out as `mesh`, and the step's sizes."""

    config: ModelConfig
    devices: int
    mesh: str = ""  # MeshShape text; empty: every device on `data`
    batch: int = 50
    tokens: int = 256
    prefix_tokens: int = 32
    soft_tokens: int = 20
    soft_offset: int = 6  # where the soft prompt starts in the prefix (after the template head)
    microbatch: int | None = None
    remat: bool = False
    dtype: str = "bfloat16"
    max_new_tokens: int = 256
    steps: tuple[str, ...] = STEPS

    def check(self) -> None:
        """Raises a `DroJaxError` for a request that cannot be planned, before any child process starts."""
        from dro_jax.dro.microbatch import check_microbatch
        from dro_jax.parallel.mesh import MeshShape

        for name in ("devices", "batch", "tokens", "soft_tokens", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DroJaxError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.soft_offset <= self.prefix_tokens - self.soft_tokens:
            raise DroJaxError(
                f"the soft prompt ({self.soft_tokens} rows from {self.soft_offset}) must lie inside the prefix of {self.prefix_tokens} tokens"
            )
        if self.dtype not in DTYPE_NAMES:
            raise DroJaxError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        unknown = set(self.steps) - set(STEPS)
        if unknown or not self.steps:
            raise DroJaxError(f"steps must be some of {', '.join(STEPS)}, got {', '.join(self.steps) or 'none'}")
        try:
            data, fsdp, _ = MeshShape.parse(self.mesh).resolve(self.devices)
        except DroJaxError as err:
            raise DroJaxError(f"--mesh {self.mesh or 'data=*'} does not match --devices {self.devices}: {err}") from None
        check_microbatch(self.microbatch, self.rows, data * fsdp)

    @property
    def rows(self) -> int:
        """The batch padded to fill every way it is split (`padded_batch_size` without a mesh at hand)."""
        from dro_jax.parallel.mesh import MeshShape

        data, fsdp, _ = MeshShape.parse(self.mesh).resolve(self.devices)
        return -(-self.batch // (data * fsdp)) * data * fsdp

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, record: dict) -> "PlanRequest":
        fields = dict(record)
        fields["config"] = ModelConfig(**fields["config"])  # the built-in shapes have no rope scaling to rebuild
        fields["steps"] = tuple(fields["steps"])
        return cls(**fields)


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled step, as `Compiled.memory_analysis()` gives them."""

    argument: int
    output: int
    temporary: int
    generated_code: int
    alias: int
    compile_seconds: float
    all_reduces: tuple[str, ...] = ()  # the compiled program's cross-device sums, as "f32[20,4096]" (distinct, sorted)

    @property
    def total(self) -> int:
        """Bytes alive at the step's peak: what it is given, what it makes, what it keeps in between; a donated
        argument that becomes an output is counted once. Generated code lives in host memory on CPU and is apart."""
        return self.argument + self.temporary + self.output - self.alias

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "total": self.total}


def budget_verdict(total: int, budget_gib: float) -> tuple[bool, float]:
    """(whether `total` bytes fit a chip of `budget_gib` GiB, the headroom in GiB: negative when it does not)."""
    headroom = budget_gib - total / GIB
    return headroom >= 0, headroom


# --- In the child process, on the simulated devices ---------------------------------------------------------


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> Any:
    import jax

    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _frozen_params(config: ModelConfig, dtype: Any, mesh: Any) -> Any:
    """The parameters as shapes in `dtype`, each with its sharding by the partition rules."""
    import jax

    from dro_jax.models.partitioning import param_shardings
    from dro_jax.models.transformer import param_shapes

    return jax.tree.map(lambda shape, sharding: _abstract(shape.shape, dtype, sharding), param_shapes(config, dtype), param_shardings(config, mesh))


def _prefix(request: PlanRequest, mesh: Any, bucket: int | None) -> Any:
    """The shared prefix as a pass takes it: training as it is (`bucket` None), the evaluation's passes padded to a
    multiple of `bucket` tokens (see `padded_prefix`)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dro_jax.models.inputs import padded_prefix
    from dro_jax.parallel.sharding import replicated

    prefix = padded_prefix(np.zeros(request.prefix_tokens, np.int32), request.soft_offset, bucket)
    return jax.tree.map(lambda part: _abstract(np.shape(part), jnp.int32, replicated(mesh)), prefix)


def _compile(jitted: Any, args: tuple, mesh: Any) -> StepMemory:
    import jax

    from dro_jax.parallel.sharding import on_mesh

    jax.clear_caches()  # an identical earlier program (generation under another remat) would compile in no time
    start = time.perf_counter()
    with on_mesh(mesh):
        compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return StepMemory(
        stats.argument_size_in_bytes, stats.output_size_in_bytes, stats.temp_size_in_bytes,
        stats.generated_code_size_in_bytes, stats.alias_size_in_bytes, seconds, all_reduce_shapes(compiled.as_text()),
    )


def all_reduce_shapes(hlo: str) -> tuple[str, ...]:
    """The result types of every all-reduce in compiled HLO text, e.g. ("f32[20,4096]", "f32[]")."""
    found = set()
    for result in re.findall(r"= (\(.*?\)|\S+) all-reduce(?:-start)?\(", hlo):
        found.update(re.findall(r"\b([a-z]+[0-9]*\[[0-9,]*\])", result))
    return tuple(sorted(found))


def compile_train_step(request: PlanRequest, mesh: Any, params: Any) -> StepMemory:
    """The training loop's own jitted step (`make_train_step` of the paper's loss) compiled for the request's shapes."""
    import jax
    import jax.numpy as jnp

    from dro_jax.dro.loss import Frozen, QueryBatch, dro_objective
    from dro_jax.dro.train import TrainConfig, make_optimizer, make_train_step
    from dro_jax.parallel.sharding import batch_sharded, replicated

    config, hidden, rows = request.config, request.config.hidden_size, request.rows
    train_config = TrainConfig(batch_size=request.batch, remat=request.remat, microbatch=request.microbatch)
    optimizer = make_optimizer(train_config)
    objective = dro_objective(config, train_config.loss_weights, request.remat, "probe", request.microbatch)
    step = make_train_step(objective.loss, optimizer, mesh)
    copied, split = replicated(mesh), batch_sharded(mesh)
    prompt = _abstract((request.soft_tokens, hidden), jnp.float32, copied)
    opt_state = jax.tree.map(lambda leaf: _abstract(leaf.shape, leaf.dtype, copied), jax.eval_shape(optimizer.init, prompt))
    own = (rows, request.tokens)
    batch = QueryBatch(
        token_ids=_abstract(own, jnp.int32, split), attention_mask=_abstract(own, jnp.int32, split),
        soft_offsets=_abstract((rows,), jnp.int32, split), base_states=_abstract((rows, hidden), jnp.float32, split),
        reference_states=_abstract((rows, hidden), jnp.float32, split), reference_log_odds=_abstract((rows,), jnp.float32, split),
        harmless=_abstract((rows,), jnp.int32, split), weights=_abstract((rows,), jnp.float32, split),
        reply_ids=_abstract((rows, 0), jnp.int32, split), reply_mask=_abstract((rows, 0), jnp.int32, split),
    )
    frozen = Frozen(
        params, _prefix(request, mesh, None), _abstract((hidden,), jnp.float32, copied),
        _abstract((hidden, NUM_COMPONENTS), jnp.float32, copied), _abstract((NUM_COMPONENTS,), jnp.float32, copied),
        _abstract((NUM_COMPONENTS,), jnp.float32, copied), None,
    )
    return _compile(step, (prompt, opt_state, batch, frozen), mesh)


def compile_generation(request: PlanRequest, mesh: Any, params: Any) -> StepMemory:
    """`dro_jax.inference.generate`'s jitted prefill + greedy decode loop compiled for the request's shapes."""
    import jax
    import jax.numpy as jnp

    from dro_jax.inference.generate import _generate
    from dro_jax.inference.sampling import SamplingConfig
    from dro_jax.models.inputs import PREFIX_BUCKET, ModelInputs
    from dro_jax.parallel.sharding import batch_sharded, replicated

    rows, copied, split = request.rows, replicated(mesh), batch_sharded(mesh)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), rows))
    inputs = ModelInputs(
        _abstract((rows, request.tokens), jnp.int32, split), _abstract((rows, request.tokens), jnp.int32, split),
        _abstract((request.soft_tokens, request.config.hidden_size), jnp.float32, copied), _abstract((rows,), jnp.int32, split),
        _prefix(request, mesh, PREFIX_BUCKET),
    )
    args = (
        params, request.config, inputs, _abstract((1,), jnp.int32, copied), _abstract(keys.shape, keys.dtype, split),
        _abstract((), jnp.int32, copied), SamplingConfig(greedy=True, max_new_tokens=request.max_new_tokens),
    )
    return _compile(_generate, args, mesh)


def plan_here(request: PlanRequest) -> dict:
    """The request's numbers, compiled in this process, which must have at least `request.devices` devices."""
    import jax
    import jax.numpy as jnp

    from dro_jax.models.partitioning import unsplit_weights
    from dro_jax.parallel.mesh import MeshShape, make_mesh

    devices = jax.devices()
    if len(devices) < request.devices:
        raise DroJaxError(f"this process has {len(devices)} devices, the plan needs {request.devices}")
    mesh = make_mesh(MeshShape.parse(request.mesh), devices[: request.devices])
    params = _frozen_params(request.config, jnp.dtype(COMPILED_AS[request.dtype]), mesh)
    leaves = jax.tree.leaves(params)
    compilers = {"train": compile_train_step, "generate": compile_generation}
    return {
        "request": request.to_json(),
        "mesh": dict(mesh.shape),
        "compiled_as": COMPILED_AS[request.dtype],
        "rows": request.rows,
        "num_parameters": request.config.num_parameters,
        "parameter_bytes": sum(leaf.size * leaf.dtype.itemsize for leaf in leaves),
        "parameter_bytes_per_device": sum(
            math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize for leaf in leaves
        ),
        "steps": {name: compilers[name](request, mesh, params).to_json() for name in request.steps},
        "kept_whole": unsplit_weights(request.config, dict(mesh.shape)),
    }


def _child_main() -> None:
    """Reads a JSON list of requests on stdin, prints the list of their plans as the last line of stdout."""
    requests = [PlanRequest.from_json(record) for record in json.loads(sys.stdin.read())]
    print(json.dumps([plan_here(request) for request in requests]))


# --- In the caller ------------------------------------------------------------------------------------------


def child_xla_flags(flags: str, devices: int) -> str:
    """The caller's XLA flags with `devices` forced host devices (instead of any count given) and the CPU-only
    passes added to any passes it disables already."""
    kept, disabled = [], list(CPU_ONLY_PASSES)
    for flag in flags.split():
        name, _, value = flag.partition("=")
        if name == "--xla_disable_hlo_passes":
            disabled += [p for p in value.split(",") if p and p not in disabled]
        elif name != "--xla_force_host_platform_device_count":
            kept.append(flag)
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}", f"--xla_disable_hlo_passes={','.join(disabled)}"])


def plan(requests: list[PlanRequest], timeout: float | None = None) -> list[dict]:
    """Each request's plan (see `plan_here`), in order; one child process per device count.

    The child runs on the CPU platform with `child_xla_flags`, so the caller's own jax, initialised or not, is
    never touched.
    """
    for request in requests:
        request.check()
    results: dict[int, dict] = {}
    for devices in sorted({request.devices for request in requests}):
        group = [i for i, request in enumerate(requests) if request.devices == devices]
        package_root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ, "XLA_FLAGS": child_xla_flags(os.environ.get("XLA_FLAGS", ""), devices),
            "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        payload = json.dumps([requests[i].to_json() for i in group])
        try:
            done = subprocess.run(
                [sys.executable, "-m", "dro_jax.bench.memory_plan"], input=payload, env=env, capture_output=True, text=True, timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise DroJaxError(f"compiling on {devices} simulated devices took over {timeout:.0f} s") from None
        if done.returncode != 0:
            raise DroJaxError(f"compiling on {devices} simulated devices failed:\n{done.stderr.strip()[-3000:]}")
        results.update(zip(group, json.loads(done.stdout.strip().splitlines()[-1])))
    return [results[i] for i in range(len(requests))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", required=True, help=f"model shape: {', '.join(SHAPES)}")
    parser.add_argument("--devices", type=int, required=True, help="simulated chips")
    parser.add_argument("--mesh", default="", help="e.g. fsdp=16 or data=2,fsdp=4,model=2 (default: every chip on data)")
    parser.add_argument("--batch", type=int, default=50, help="queries per step (default: %(default)s, the reference's)")
    parser.add_argument("--tokens", type=int, default=256, help="each row's own tokens after the shared prefix (default: %(default)s)")
    parser.add_argument("--prefix-tokens", type=int, default=32, help="the shared prefix holding the soft prompt (default: %(default)s)")
    parser.add_argument("--soft-tokens", type=int, default=20, help="soft-prompt rows (default: %(default)s)")
    parser.add_argument("--microbatch", type=int, default=None, help="rows through the model at a time in the train step")
    parser.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="weights' dtype (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens (default: %(default)s)")
    parser.add_argument("--budget-gib", type=float, default=16.0, help="memory per chip (default: %(default)s GiB)")
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS, help="what to compile (default: both)")
    parser.add_argument("--timeout", type=float, default=None, help="give up compiling after this many seconds")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")


def request_from_args(args: argparse.Namespace) -> PlanRequest:
    if args.shape not in SHAPES:
        raise DroJaxError(f"unknown --shape {args.shape!r}; choose one of {', '.join(SHAPES)}")
    return PlanRequest(
        SHAPES[args.shape], args.devices, args.mesh, args.batch, args.tokens, args.prefix_tokens, args.soft_tokens,
        min(6, max(args.prefix_tokens - args.soft_tokens, 0)),  # after the template head, as in Llama-2's chat format
        args.microbatch, args.remat, args.dtype, args.max_new_tokens, tuple(args.steps),
    )


def report(result: dict, budget_gib: float) -> str:
    """The plan as text: what was compiled, the model's bytes, and one table row per step with its verdict."""
    from dro_jax.parallel.sharding import PADDING_WARNED_ABOVE  # the threshold a run warns at

    request = PlanRequest.from_json(result["request"])
    mesh = ",".join(f"{axis}={size}" for axis, size in result["mesh"].items())
    lines = [
        f"{result['num_parameters'] / 1e9:.3f}e9 parameters ({result['num_parameters']:,}), {request.dtype}: "
        f"{result['parameter_bytes'] / GIB:.2f} GiB in all, {result['parameter_bytes_per_device'] / GIB:.2f} GiB per device",
        f"{request.devices} device{'s' if request.devices > 1 else ''} as {mesh}; batch {request.batch} (padded to {result['rows']}), {request.prefix_tokens} shared + "
        f"{request.tokens} own tokens per row; microbatch {request.microbatch or 'none'}, remat {'on' if request.remat else 'off'}; "
        f"generation {request.max_new_tokens} new tokens, greedy; compiled for XLA:CPU in {result['compiled_as']}; "
        f"budget {budget_gib:g} GiB per device",
        *(f"warning: {line}" for line in result["kept_whole"]),
        *([f"warning: {1 - request.batch / result['rows']:.0%} of each batch is filler"]
          if result["rows"] - request.batch > PADDING_WARNED_ABOVE * result["rows"] else []),
        "",
    ]
    rows = []
    for name, step in result["steps"].items():
        fits, headroom = budget_verdict(step["total"], budget_gib)
        rows.append([
            {"train": "train step", "generate": "generation"}[name],
            *(f"{step[key] / GIB:.2f}" for key in ("argument", "temporary", "output", "alias", "total")),
            f"{'fits' if fits else 'does not fit'} ({headroom:+.2f} GiB)", f"{step['compile_seconds']:.1f}",
        ])
    header = ["step", "arguments GiB", "temporaries GiB", "outputs GiB", "aliased GiB", "total GiB / device", "verdict (headroom)", "compile s"]
    sums = [f"{name}: {', '.join(step['all_reduces']) or 'none'}" for name, step in result["steps"].items()]
    return "\n".join([*lines, markdown_table(header, rows), "", f"cross-device sums (all-reduce results) per step: {'; '.join(sums)}"])


def run(args: argparse.Namespace) -> None:
    result = plan([request_from_args(args)], args.timeout)[0]
    print(report(result, args.budget_gib))
    if args.json is not None:
        for step in result["steps"].values():
            step["fits"], step["headroom_gib"] = budget_verdict(step["total"], args.budget_gib)
        args.json.write_text(json.dumps({**result, "budget_gib": args.budget_gib}, indent=2) + "\n")


if __name__ == "__main__":
    _child_main()
