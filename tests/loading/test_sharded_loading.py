"""Sharded loading: parameters laid out over 8 forced host devices straight from the checkpoint.

The 8-device checks run in one subprocess (XLA_FLAGS must be set before jax
starts), which reports what it saw as JSON: each parameter against the
unsharded load, the shapes of its device shards, how much of each tensor was
read, and the host memory (traced by `tracemalloc`) of a sharded load against
the whole-buffer load of the same checkpoint.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dro_jax.common.errors import DroJaxError
from dro_jax.loading import load_model
from dro_jax.loading.hf import SafetensorsSource
from dro_jax.models.transformer import param_shapes
from helpers import tiny_torch_model, write_tiny_gguf
from processes import device_env

REPO = Path(__file__).resolve().parents[2]
MESH_SHAPE = {"fsdp": 2, "model": 4}
# Every kind of layout on the (2, 4) mesh: split on the output dim, the input dim, over both mesh axes at once,
# on the layer axis, partly replicated, fully replicated. Tiny llama: vocab 320, hidden 64, mlp 128, 2 layers,
# 4 heads and 2 kv heads of 16.
SPECS = {
    "embed_tokens.weight": [["fsdp", "model"]],
    "lm_head.weight": ["model", "fsdp"],
    "norm.weight": [],
    "layers.input_layernorm.weight": [],
    "layers.post_attention_layernorm.weight": ["fsdp"],
    "layers.self_attn.q_proj.weight": [None, "model", "fsdp"],
    "layers.self_attn.k_proj.weight": [None, "model"],
    "layers.self_attn.v_proj.weight": ["fsdp", "model"],
    "layers.self_attn.o_proj.weight": [None, None, "model"],
    "layers.mlp.gate_proj.weight": [None, ["fsdp", "model"]],
    "layers.mlp.up_proj.weight": [None, ["fsdp", "model"]],
    "layers.mlp.down_proj.weight": [None, None, ["fsdp", "model"]],
}

EIGHT_DEVICES = r'''
import contextlib, gc, json, sys, tracemalloc
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.numpy import save_file

from dro_jax.loading import load_model
from dro_jax.loading.hf import SafetensorsSource
from dro_jax.loading.weights import build_params, hf_tensor_name
from dro_jax.models import ModelConfig
from dro_jax.models.transformer import param_shapes

args = json.loads(sys.argv[1])
assert jax.device_count() == 8
mesh = Mesh(np.array(jax.devices()).reshape(tuple(args["mesh"].values())), tuple(args["mesh"]))


def name_of(key_path):
    return ".".join(k.key for k in key_path)


def spec_of(axes):
    return PartitionSpec(*(tuple(a) if isinstance(a, list) else a for a in axes))


def shardings(config, specs=args["specs"]):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: NamedSharding(mesh, spec_of(specs.get(name_of(kp), []))), param_shapes(config)
    )


class CountingSource:
    """Counts the elements read from each tensor."""

    def __init__(self, source):
        self.source, self.description, self.read = source, source.description, {}

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def read_slice(self, name, index):
        part = self.source.read_slice(name, index)
        self.read[name] = self.read.get(name, 0) + part.size
        return part


def compare(sharded, whole, placed):
    """Per parameter: equal to the whole load (values and dtype), laid out as asked, its shards' shapes and bytes."""
    out = {}
    for (kp, a), b, s in zip(jax.tree_util.tree_flatten_with_path(sharded)[0], jax.tree.leaves(whole), jax.tree.leaves(placed)):
        out[name_of(kp)] = dict(
            equal=a.dtype == b.dtype and bool(np.array_equal(np.asarray(a), np.asarray(b))),
            laid_out=a.sharding.is_equivalent_to(s, a.ndim),
            shape=list(a.shape),
            shard_shapes=sorted({tuple(x.data.shape) for x in a.addressable_shards}),
            shard_bytes=sorted({x.data.nbytes for x in a.addressable_shards}),
            devices=len(a.addressable_shards), nbytes=a.nbytes,
        )
    return out


report = {}
hf = Path(args["hf"])
whole = load_model(hf, with_tokenizer=False, progress=False)
sharded = load_model(hf, with_tokenizer=False, progress=False, shardings=shardings)
report["safetensors"] = compare(sharded.params, whole.params, shardings(whole.config))
report["bfloat16"] = compare(
    load_model(hf, "bfloat16", with_tokenizer=False, progress=False, shardings=shardings).params,
    load_model(hf, "bfloat16", with_tokenizer=False, progress=False).params, shardings(whole.config))
gguf = Path(args["gguf"])
report["gguf"] = compare(
    load_model(gguf, with_tokenizer=False, progress=False, shardings=shardings).params,
    load_model(gguf, with_tokenizer=False, progress=False).params, shardings(whole.config))
with contextlib.ExitStack() as stack:
    counting = CountingSource(SafetensorsSource(hf, stack))
    build_params(whole.config, counting, jnp.float32, progress=False, shardings=shardings(whole.config))
    report["tensor_sizes"] = {name: int(np.prod(counting.shape(name))) for name in counting.names()}
report["elements_read"] = counting.read
del whole, sharded

# Host memory: a checkpoint whose stacked mlp weights (8 MiB each) dwarf the rest, split 8 ways on the mlp dim.
config = ModelConfig.from_hf_dict(dict(model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=16384,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
rng = np.random.default_rng(0)
tensors = {}
for kp, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
    path = tuple(k.key for k in kp)
    for layer in (range(config.num_layers) if path[0] == "layers" else [None]):
        shape = leaf.shape[1:] if layer is not None else leaf.shape
        tensors[hf_tensor_name(path, layer)] = rng.standard_normal(shape, dtype=np.float32)
big = Path(args["tmp"]) / "big"
big.mkdir()
save_file(tensors, str(big / "model.safetensors"))
del tensors
mlp = {"layers.mlp.gate_proj.weight": [None, ["fsdp", "model"]], "layers.mlp.up_proj.weight": [None, ["fsdp", "model"]],
       "layers.mlp.down_proj.weight": [None, None, ["fsdp", "model"]]}
placed = shardings(config, mlp)


def traced_load(placement):
    """(peak, still held after the load) bytes traced while loading, the result kept alive until measured.

    Measured on the second of two loads: the first also fills jax's caches for these shapes (lazy imports,
    compiled conversions), memory that stays held but is not the loader's.
    """
    for _ in range(2):
        gc.collect()
        with contextlib.ExitStack() as stack:
            source = SafetensorsSource(big, stack)
            tracemalloc.start()
            params = build_params(config, source, jnp.float32, progress=False, shardings=placement)
            jax.block_until_ready(params)
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    return params, peak, held


whole_params, report["whole_peak"], report["whole_held"] = traced_load(None)
sharded_params, report["sharded_peak"], report["sharded_held"] = traced_load(placed)
assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(whole_params), jax.tree.leaves(sharded_params)))
report["largest_param"] = max(leaf.nbytes for leaf in jax.tree.leaves(sharded_params))
report["largest_shard"] = max(x.data.nbytes for leaf in jax.tree.leaves(sharded_params) for x in leaf.addressable_shards)
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
    """Runs the 8-device checks once (a tiny llama as several safetensors shards and as GGUF); returns their report."""
    tmp = tmp_path_factory.mktemp("sharded_loading")
    model = tiny_torch_model("llama")
    model.save_pretrained(tmp / "hf", max_shard_size="50KB")
    assert (tmp / "hf" / "model.safetensors.index.json").is_file()
    write_tiny_gguf(model, tmp / "tiny.gguf")
    args = dict(mesh=MESH_SHAPE, specs=SPECS, hf=str(tmp / "hf"), gguf=str(tmp / "tiny.gguf"), tmp=str(tmp))
    env = {
        **device_env(8),
        # XLA's CPU client keeps a 64-byte-aligned host array as the device buffer instead of copying it, and that
        # memory would be traced as if the loader still held it. glibc places each allocation at or above this
        # size in its own mapping, 16 bytes past a page boundary, so the loader's buffers are copied and freed.
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    done = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, json.dumps(args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _expected_shard_shape(shape: list[int], axes: list) -> tuple[int, ...]:
    splits = [math.prod(MESH_SHAPE[a] for a in (axis if isinstance(axis, list) else [axis])) if axis else 1 for axis in axes]
    splits += [1] * (len(shape) - len(splits))
    return tuple(n // k for n, k in zip(shape, splits))


@pytest.mark.parametrize("checkpoint", ["safetensors", "bfloat16", "gguf"])
def test_sharded_load_equals_the_whole_load_with_each_device_holding_its_part(eight_devices, checkpoint):
    params = eight_devices[checkpoint]
    assert set(params) == set(SPECS)
    for name, p in params.items():
        shard = _expected_shard_shape(p["shape"], SPECS[name])
        assert p["equal"] and p["laid_out"], name
        assert p["devices"] == 8 and p["shard_shapes"] == [list(shard)], (name, p["shard_shapes"], shard)
        assert p["shard_bytes"] == [p["nbytes"] * math.prod(shard) // math.prod(p["shape"])], name
    # The split ones hold 1/2, 1/4 or 1/8 of the parameter per device.
    assert params["layers.mlp.gate_proj.weight"]["shard_bytes"] == [params["layers.mlp.gate_proj.weight"]["nbytes"] // 8]
    assert params["lm_head.weight"]["shard_bytes"] == [params["lm_head.weight"]["nbytes"] // 8]


def test_each_tensor_is_read_once_however_many_devices_hold_a_part(eight_devices):
    """Replicas share one read (norm.weight is on all 8 devices, k_proj's parts on 2 each), and no part is read twice."""
    assert eight_devices["elements_read"] == eight_devices["tensor_sizes"]


def test_host_memory_is_one_device_part_not_the_whole_tensor(eight_devices):
    """The whole-buffer load holds an 8 MiB stacked mlp weight on the host; split 8 ways, 1 MiB parts."""
    report = eight_devices
    largest, shard = report["largest_param"], report["largest_shard"]
    assert largest == 8 * 2**20 and shard == largest // 8
    # No loader buffer stays held by the sharded arrays (only their small Python objects), so its peak measures
    # what loading holds on the host on top of the result. (The whole-buffer load's one array may stay held:
    # XLA:CPU may adopt an aligned host buffer as the device buffer instead of copying it.)
    assert report["sharded_held"] < shard, report
    assert report["whole_peak"] >= largest, report  # the old way: the whole stacked tensor at once
    # The part being read, the one before it (jax lets go of a transferred buffer at its next transfer) and one
    # layer's half of the part while stacking: 2.5 parts, and the arrays' Python objects.
    assert report["sharded_peak"] <= 3 * shard, report
    assert report["sharded_peak"] * 4 < report["whole_peak"], report


def _one_device(config):
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    return jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), param_shapes(config))


def _no_reads(self, name, index):
    raise AssertionError(f"read {name} before checking every tensor")


def test_missing_tensor_with_shardings(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = tiny_torch_model("llama")
    model.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(state, tmp_path / "model.safetensors")
    monkeypatch.setattr(SafetensorsSource, "read_slice", _no_reads)
    with pytest.raises(DroJaxError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
        load_model(tmp_path, with_tokenizer=False, progress=False, shardings=_one_device)


def test_wrong_tensor_shape_with_shardings(tmp_path, monkeypatch):
    tiny_torch_model("llama").save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr(SafetensorsSource, "read_slice", _no_reads)
    with pytest.raises(DroJaxError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 128\), the config implies \(64, 96\)"):
        load_model(tmp_path, with_tokenizer=False, progress=False, shardings=_one_device)
