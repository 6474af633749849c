import dataclasses
import gc
import json
import os
import shutil
import tempfile

# A persistent compilation cache for the suite, set before JAX is imported so that the subprocesses the tests
# start (several hosts, the experiments) inherit it: the modules compile the same tiny models' programs again
# after each drops its in-memory caches (below), and each subprocess would compile them from scratch. A cache
# directory set by the caller is used as it is (and kept); otherwise a new one is made and removed at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dro-jax-tests-xla-")
# Every program is kept, however fast it compiled: the tiny models' many sub-second compiles recur across modules.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# The tests' models are tiny, so their time is XLA compiling, not running. Without LLVM's optimisation passes the
# suite compiles about a third faster; with XLA:CPU's older loop emitters instead of its MLIR fusion emitters, a
# tiny model's passes compile in about two thirds of the time again (a shared-prefix test: 19.4 s -> 12.3 s). What
# the tests check (values, within float32 tolerances) does not depend on how the CPU code is generated; the
# subprocesses inherit the flags (tests/processes.py adds the forced device count to them).
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()

# Float32 is compared with PyTorch's float32: on a GPU, jax's default would run float32 matmuls as TF32 (the
# command line's --precision highest does the same for users). On CPU both are exact float32.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# One share of the cores per xdist worker: two workers with two PyTorch threads each on two cores spend their time
# waiting on each other (a SmolLM2 parity test took 53 s beside the multi-host tests with 2 threads, 31 s with 1).
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    """The files marked `heavy` (subprocess jobs, the main job, SmolLM2) first, the others after in their order:
    each file runs whole on one xdist worker (--dist loadfile, with --no-loadscope-reorder keeping this order), and
    a long file started last would leave the other worker idle at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# Each XLA CPU executable holds memory maps of its own; a process past the kernel's limit on maps
# (vm.max_map_count, 65,530 by default) crashes when it compiles the next program. One test module added at
# most 15,000 maps in the suite (a whole suite's run, counted at each module's end).
MAX_MAPS = 30_000


def _many_memory_maps() -> bool:
    try:
        with open("/proc/self/maps") as maps:
            return sum(1 for _ in maps) > MAX_MAPS
    except OSError:  # no procfs to count them: take no chances
        return True


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_caches():
    """A test module ends by dropping JAX's compiled programs once the process holds many memory maps (well below
    the kernel's limit); below that, the next modules reuse the programs they share (the tiny models' passes)."""
    yield
    if _many_memory_maps():
        jax.clear_caches()
        gc.collect()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory: a saved tiny HF directory (with tokenizer) and its torch model, cached per config name."""
    from helpers import save_tiny_model

    cache = {}

    def make(name: str = "llama"):
        if name not in cache:
            directory = tmp_path_factory.mktemp(name)
            cache[name] = (directory, save_tiny_model(name, directory))
        return cache[name]

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct, loaded once per test process (5 s each time); tests must not change it."""
    from dro_jax.loading import load_model

    return load_model("smollm2", progress=False)


@pytest.fixture(scope="session")
def torch_smollm2():
    """transformers reading the same GGUF file (13 s each time), frozen and in eval mode; tests must not change it."""
    from transformers import AutoModelForCausalLM

    from dro_jax.loading import resolve_model_path
    from dro_jax.parity.torch_dro import freeze

    path = resolve_model_path("smollm2")
    return freeze(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)).eval()


@pytest.fixture(scope="session")
def forced(tmp_path_factory):
    """Directories of the forced policy and judges (see `helpers.save_forced_models`)."""
    from helpers import save_forced_models

    return save_forced_models(tmp_path_factory.mktemp("forced"))


@dataclasses.dataclass(frozen=True)
class TinyDro:
    """The tiny llama with an anchor space and a DRO training set built from the helpers' paired queries."""

    directory: object
    model: object
    pairs: object
    anchors: object
    report: dict
    initial: object  # the soft prompt initialised from the short prompt
    data: object  # its TrainingSet

    @property
    def task(self):
        """DRO from the short prompt on the training set, with the anchor space."""
        from dro_jax.dro.task import TrainingTask

        return TrainingTask(self.initial, self.data, anchors=self.anchors)


@pytest.fixture(scope="session")
def tiny_dro(tiny_model_dir):
    from dro_jax.anchors.collect import AnchorConfig, build_anchor_space
    from dro_jax.data.queries import QueryPairs
    from dro_jax.dro.soft_prompt import initial_soft_prompt
    from dro_jax.dro.training_set import prepare_training_set
    from dro_jax.loading import load_model
    from helpers import HARMFUL, HARMLESS, QUIET, TINY_FIT, TINY_OPENINGS

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    pairs = QueryPairs(HARMFUL, HARMLESS)
    config = AnchorConfig(settings=("none", "short"), openings=TINY_OPENINGS, fit=TINY_FIT)
    anchors, report, _ = build_anchor_space(model, pairs, config, batching=QUIET)
    initial = initial_soft_prompt(model.params, model.tokenizer, "short")
    data = prepare_training_set(model, pairs, "short", len(initial), batching=QUIET, openings=TINY_OPENINGS)
    return TinyDro(directory, model, pairs, anchors, report, initial, data)


@pytest.fixture()
def query_files(tmp_path, tiny_dro):
    """The tiny paired queries as harmful.txt and harmless.txt files."""
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(tiny_dro.pairs.harmful), encoding="utf-8")
    harmless.write_text("\n".join(tiny_dro.pairs.harmless), encoding="utf-8")
    return harmful, harmless


@pytest.fixture(scope="session")
def run_args(tiny_model_dir, tmp_path_factory):
    """Factory: the `dro-jax run` arguments of a tiny run into `out` (the tiny llama, its paired queries, one epoch)."""
    from helpers import HARMFUL, HARMLESS

    directory, _ = tiny_model_dir("llama")
    data = tmp_path_factory.mktemp("queries")
    files = {}
    for name, queries in (("harmful", HARMFUL), ("harmless", HARMLESS), ("harmful-test", HARMFUL[:3]), ("harmless-test", HARMLESS[:3])):
        files[name] = data / f"{name}.txt"
        files[name].write_text("\n".join(queries), encoding="utf-8")
    files["openings"] = data / "openings.json"  # single tokens: the tiny model's log-odds stay unsaturated
    files["openings"].write_text(json.dumps({"refusal": ["No"], "compliant": ["Sure"]}))

    def make(out, *extra):
        args = ["run", "--model", str(directory), "--epochs", "1", "--batch-size", "4", "--max-new-tokens", "4",
                "--settings", "none", "short", "--out", str(out)]
        for name, path in files.items():
            args += [f"--{name}", str(path)]
        return args + list(extra)

    return make
