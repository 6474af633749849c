"""Training a soft prompt: the loss goes down and only the prompt moves, failures keep the last good state,
checkpoints belong to one model, and a batch sharded over 4 devices trains as on one."""

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.common.errors import DroJaxError
from dro_jax.dro.loss import Objective, dro_loss, dro_objective
from dro_jax.dro.train import TrainConfig, TrainingFiles, frozen_inputs, train_soft_prompt
from dro_jax.inference.settings import load_soft_prompt
from dro_jax.loading import load_model
from processes import device_env

TRAIN = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, checkpoint_every=1)


def _full_batch(data):
    return jax.tree.map(jnp.asarray, data.rows(np.arange(len(data)), np.ones(len(data), np.float32)))


def test_training_lowers_the_loss_and_only_moves_the_prompt(tiny_dro, tmp_path):
    model, anchors, initial, data = tiny_dro.model, tiny_dro.anchors, tiny_dro.initial, tiny_dro.data
    before = jax.tree.map(np.asarray, model.params)
    # Full batch and a small step: the tiny model's embeddings are only 0.02 in scale.
    config = TrainConfig(epochs=10, batch_size=12, learning_rate=1e-4, checkpoint_every=100)
    result = train_soft_prompt(model, tiny_dro.task, config, TrainingFiles(tmp_path / "run"), progress=False)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors, data.prefix)
    start, _ = dro_loss(jnp.asarray(initial), batch, frozen, model.config)
    end, _ = dro_loss(jnp.asarray(result.soft_prompt), batch, frozen, model.config)
    assert float(end) < float(start) - 1e-4, (float(start), float(end))
    assert result.steps == 10 and len(result.metrics) == 10
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == list(range(1, 11))
    own_tokens = int(np.asarray(data.attention_mask).sum())  # the full batch: every row's own tokens per step
    step_flops = config.dro_objective(model.config).step_flops(data.rows(np.arange(12), np.ones(12, np.float32)), frozen)
    for line in lines:
        assert line["step_seconds"] > 0 and line["tokens_per_second"] == pytest.approx(own_tokens / line["step_seconds"])
        assert line["model_tflop_per_second"] == pytest.approx(step_flops / line["step_seconds"] / 1e12)
        assert "mfu" not in line  # a CPU's peak is not a datasheet figure
    np.testing.assert_array_equal(load_soft_prompt(tmp_path / "run" / "soft_prompt.safetensors"), result.soft_prompt)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_dro, tmp_path):
    model = tiny_dro.model
    reference = jnp.asarray(tiny_dro.initial)
    dro = dro_objective(model.config)

    def breaks_after_one_step(soft_prompt, batch, frozen):
        total, metrics = dro.loss(soft_prompt, batch, frozen)
        moved = jnp.any(soft_prompt != reference)
        return jnp.where(moved, jnp.nan, total), metrics

    with pytest.raises(DroJaxError, match="last good checkpoint is step 1"):
        breaking = dataclasses.replace(tiny_dro.task, objective=Objective("breaks", breaks_after_one_step, dro.shown, dro.step_flops))
        train_soft_prompt(model, breaking, TRAIN, TrainingFiles(tmp_path / "ck"), progress=False)
    assert sorted(p.name for p in (tmp_path / "ck" / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_resume_refuses_a_checkpoint_of_another_model(tiny_dro, tmp_path):
    from helpers import save_tiny_model

    model = tiny_dro.model
    train_soft_prompt(model, tiny_dro.task, TRAIN, TrainingFiles(tmp_path / "ck"), progress=False)
    save_tiny_model("llama", tmp_path / "other", seed=1)  # same sizes and tokenizer, other weights
    other = load_model(tmp_path / "other", progress=False)
    with pytest.raises(DroJaxError, match="another model"):
        train_soft_prompt(other, tiny_dro.task, TRAIN, TrainingFiles(tmp_path / "ck"), resume=True, progress=False)
    with pytest.raises(DroJaxError, match="--resume"):
        train_soft_prompt(model, tiny_dro.task, TRAIN, TrainingFiles(tmp_path / "ck"), progress=False)


SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
from dro_jax.anchors.space import AnchorSpace
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.task import TrainingTask
from dro_jax.dro.train import TrainConfig, TrainingFiles, train_soft_prompt
from dro_jax.dro.training_set import prepare_training_set
from dro_jax.inference.batched import Batching
from dro_jax.loading import load_model
from dro_jax.parallel.mesh import data_mesh
import dro_jax.dro.train
assert len(jax.devices()) == 4
shard_batch, batches = dro_jax.dro.train.shard_batch, []
def recording(batch, mesh):  # (rows, devices holding them) of every batch training places, as train.py looks it up
    sharded = shard_batch(batch, mesh)
    batches.append((len(sharded.token_ids), len(sharded.token_ids.sharding.device_set)))
    return sharded
dro_jax.dro.train.shard_batch = recording
model = load_model({model!r}, progress=False)
anchors = AnchorSpace.load({anchors!r})
initial = initial_soft_prompt(model.params, model.tokenizer, "short")
data = prepare_training_set(model, QueryPairs({harmful!r}, {harmless!r}), "short", len(initial), batching=Batching(progress=False))
config = TrainConfig(epochs=2, batch_size=5, learning_rate=1e-2, checkpoint_every=100)
results, placed = [], []
for count in (1, 4):
    mesh = data_mesh(jax.devices()[:count])
    batches.clear()
    out = train_soft_prompt(model, TrainingTask(initial, data, anchors=anchors), config, TrainingFiles({tmp!r} + f"/ck{{count}}"), progress=False, mesh=mesh)
    results.append(out)
    placed.append(sorted(set(batches)))
np.save({tmp!r} + "/one.npy", results[0].soft_prompt)
np.save({tmp!r} + "/four.npy", results[1].soft_prompt)
print(json.dumps([[[m["loss"] for m in r.metrics] for r in results], placed]))
"""


def test_four_devices_give_the_single_device_result(tiny_dro, tmp_path):
    """Batch sharded over 4 forced host devices (5 rows padded to 8) against one device."""
    anchor_file = tiny_dro.anchors.save(tmp_path / "anchors.safetensors")
    script = SHARDING_SCRIPT.format(
        model=str(tiny_dro.directory), anchors=str(anchor_file),
        harmful=list(tiny_dro.pairs.harmful), harmless=list(tiny_dro.pairs.harmless), tmp=str(tmp_path),
    )
    done = subprocess.run([sys.executable, "-c", script], env=device_env(4), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (one_losses, four_losses), (one_batches, four_batches) = json.loads(done.stdout.strip().splitlines()[-1])
    assert one_batches == [[5, 1]] and four_batches == [[8, 4]]  # each run split its batches over the mesh it was given
    np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5)
    one, four = np.load(tmp_path / "one.npy"), np.load(tmp_path / "four.npy")
    assert np.abs(one - tiny_dro.initial).max() > 1e-3  # it trained
    # The soft prompt's gradient is a sum over rows (through the shared prefix's keys and values), reduced in
    # another order across 4 devices; Adam's normalised step carries that float32 noise into the prompt.
    np.testing.assert_allclose(four, one, atol=1e-5, rtol=1e-3)
