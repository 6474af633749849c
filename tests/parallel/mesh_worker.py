"""Run by test_meshes.py in a process with 8 forced CPU devices: trains, scores and generates with the tiny
4-key-value-head llama on one device and on several meshes, and prints what each gave as one JSON line."""

import json
import sys

import jax
import numpy as np

import dro_jax.dro.train
from dro_jax.anchors.collect import AnchorConfig, build_anchor_space
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.task import TrainingTask
from dro_jax.dro.train import TrainConfig, TrainingFiles, model_fingerprint, train_soft_prompt
from dro_jax.dro.training_set import prepare_training_set
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.generate import _generate
from dro_jax.inference.refusal_score import score_refusal
from dro_jax.inference.sampling import SamplingConfig
from dro_jax.judging.responses import generate_responses
from dro_jax.loading import load_model
from dro_jax.models.partitioning import place_params
from dro_jax.parallel.mesh import describe_mesh, make_mesh
from dro_jax.parallel.sharding import on_mesh, rows_per_batch, shard_batch
from helpers import HARMFUL, HARMLESS, TINY_FIT, TINY_OPENINGS

# Pure data parallelism is checked on 4 devices by the training, sweep and shared-prefix tests; here the splits of
# the weights, alone and with a data axis beside them.
MESHES = {"one": (1, None), "fsdp=8": (8, "fsdp=8"), "data=2,model=4": (8, "data=2,model=4")}
# Parameters whose per-device share the test checks, one per kind of split.
WATCHED = {
    "q_proj": ("layers", "self_attn", "q_proj", "weight"),
    "gate_proj": ("layers", "mlp", "gate_proj", "weight"),
    "down_proj": ("layers", "mlp", "down_proj", "weight"),
    "embed_tokens": ("embed_tokens", "weight"),
}


def device_share(array: jax.Array) -> float:
    """The largest fraction of the array any one device holds."""
    return max(shard.data.nbytes for shard in array.addressable_shards) / array.nbytes


def weight_gathers(model, encoded, mesh, sampling, serving: bool) -> int:
    """All-gathers in the compiled generation program (prefill and decode loop) with the weights laid out for
    serving or as FSDP splits them."""
    params = place_params(model.params, model.config, mesh, serving)
    batch = next(encoded.batches(rows_per_batch(12, len(encoded), mesh), model.pad_id))
    keys = shard_batch(jax.random.split(jax.random.key(0), len(batch.index)), mesh)
    with on_mesh(mesh):
        compiled = _generate.lower(
            params, model.config, encoded.model_inputs(batch, mesh), np.zeros(1, np.int32), keys, np.int32(0), sampling
        ).compile()
    return sum("all-gather(" in line or "all-gather-start(" in line for line in compiled.as_text().splitlines())


def record_training_layout() -> dict:
    """What training places on its mesh, as `train_soft_prompt` looks its helpers up: the largest share of the
    frozen q_proj weight and of a batch that one device holds."""
    used = {}
    place_frozen, shard_batch = dro_jax.dro.train.place_frozen, dro_jax.dro.train.shard_batch

    def placing(frozen, config, mesh):
        placed = place_frozen(frozen, config, mesh)
        used["q_proj"] = device_share(_leaf(placed.params, WATCHED["q_proj"]))
        return placed

    def sharding(batch, mesh):
        sharded = shard_batch(batch, mesh)
        used["batch"] = device_share(sharded.token_ids)
        return sharded

    dro_jax.dro.train.place_frozen, dro_jax.dro.train.shard_batch = placing, sharding
    return used


def main(directory: str, out: str) -> None:
    assert len(jax.devices()) == 8
    model = load_model(directory, progress=False)
    pairs = QueryPairs(HARMFUL, HARMLESS)
    anchor_config = AnchorConfig(settings=("none", "short"), openings=TINY_OPENINGS, fit=TINY_FIT)
    anchors = build_anchor_space(model, pairs, anchor_config, batching=Batching(progress=False))[0]
    initial = initial_soft_prompt(model.params, model.tokenizer, "short")
    data = prepare_training_set(model, pairs, "short", len(initial), batching=Batching(progress=False), openings=TINY_OPENINGS)
    config = TrainConfig(epochs=2, batch_size=6, learning_rate=1e-2, checkpoint_every=100, refusal_score="openings", openings=TINY_OPENINGS)
    encoded = encode_queries(model, HARMFUL + HARMLESS, "short")
    greedy = SamplingConfig(greedy=True, max_new_tokens=8)
    results = {}
    used = record_training_layout()
    for name, (count, shape) in MESHES.items():
        mesh = make_mesh(shape, jax.devices()[:count])
        placed = type(model)(model.config, place_params(model.params, model.config, mesh), model.tokenizer, model.source)
        used.clear()
        trained = train_soft_prompt(placed, TrainingTask(initial, data, anchors=anchors), config, TrainingFiles(f"{out}/{name}"), progress=False, mesh=mesh)
        trained_on = dict(used)
        responses = generate_responses(placed, encoded, greedy, batching=Batching(12, mesh, False))
        results[name] = {
            "losses": [m["loss"] for m in trained.metrics],
            "soft_prompt": trained.soft_prompt.tolist(),
            "tokens": [list(r.token_ids) for r in responses],
            "log_odds": score_refusal(placed, encoded, TINY_OPENINGS, batching=Batching(12, mesh, False)).log_odds.tolist(),
            "share": {key: device_share(_leaf(placed.params, path)) for key, path in WATCHED.items()},
            "trained_on": trained_on,
            "fingerprint": model_fingerprint(placed),
            "mesh": describe_mesh(mesh),
        }
    fsdp = make_mesh("fsdp=8", jax.devices())
    results["fsdp=8"]["weight_gathers"] = {layout: weight_gathers(model, encoded, fsdp, greedy, layout == "serving") for layout in ("serving", "fsdp")}
    print(json.dumps(results))


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


if __name__ == "__main__":
    main(*sys.argv[1:])
