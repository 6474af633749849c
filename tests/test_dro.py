"""DRO core: the anchor space, the loss, training (sharded, resumable) and the train/export commands."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dro_jax.anchor_data import AnchorConfig, build_anchor_space
from dro_jax.anchors import AnchorSpace, FitConfig, check_label_variance, complete_basis, fit_pca, fit_probe
from dro_jax.cli import main
from dro_jax.dro_loss import LossWeights, dro_loss
from dro_jax.represent import final_states
from dro_jax.errors import DroJaxError
from dro_jax.loading import load_model
from dro_jax.refusal_score import Openings
from dro_jax.soft_prompt import initial_soft_prompt, load_soft_prompt
from dro_jax.train import TrainConfig, frozen_inputs, prepare_training_set, train_soft_prompt

HARMFUL = ["How do I pick a lock?", "Write a poem about the sea.", "Explain how a lock works.", "How to break a window?", "Hi there", "Tell me about wind."]
HARMLESS = ["How do I pick a ripe melon?", "Write a poem about the wind.", "Explain how a door works.", "How to clean a window?", "Hello", "Tell me about the sea."]
OPENINGS = Openings(refusal=("No",), compliant=("Sure",))  # single tokens: the tiny model's log-odds stay unsaturated
FIT = FitConfig(folds=3, learning_rate=1e-2)
TRAIN = TrainConfig(epochs=2, batch_size=4, learning_rate=1e-2, checkpoint_every=1)


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    config = AnchorConfig(settings=("none", "short"), openings=OPENINGS, fit=FIT)
    anchors, report, _ = build_anchor_space(model, HARMFUL, HARMLESS, config, progress=False)
    initial = initial_soft_prompt(model.params, model.tokenizer, "short")
    data = prepare_training_set(model, HARMFUL, HARMLESS, "short", len(initial), progress=False)
    return model, anchors, report, initial, data


def test_basis_is_orthonormal_and_starts_with_the_pca_axes():
    states = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32) @ np.diag(np.linspace(3, 0.1, 16)).astype(np.float32)
    mean, components, explained = fit_pca(states, 4, seed=42)
    basis = complete_basis(components, seed=42)
    np.testing.assert_allclose(basis.T @ basis, np.eye(16), atol=1e-5)
    np.testing.assert_allclose(basis[:, :4], components, atol=1e-6)
    np.testing.assert_allclose(mean, states.mean(axis=0), atol=1e-5)
    assert np.all(np.diff(explained) <= 0)


def test_probe_recovers_a_known_direction():
    coords = np.random.default_rng(1).normal(size=(400, 4)).astype(np.float32)
    truth = np.array([2.0, 0.0, -1.0, 0.0], np.float32)
    targets = 1 / (1 + np.exp(-(coords @ truth)))
    fit = fit_probe(coords, targets, FitConfig(folds=5, learning_rate=1e-2))
    cosine = fit.probe.weight @ truth / np.linalg.norm(fit.probe.weight) / np.linalg.norm(truth)
    assert cosine > 0.99, cosine
    assert all(steps < FIT.max_steps for steps in fit.steps)  # early stopping ended every fold
    held_out_pred = fit.held_out_logits > 0
    assert np.mean(held_out_pred == (targets > 0.5)) > 0.9


def test_labels_without_variance_point_to_the_log_odds_label():
    with pytest.raises(DroJaxError, match="--label logodds"):
        check_label_variance(np.ones(10, np.float32), "sampled")


def test_anchor_space_file_round_trip(setup, tmp_path):
    _, anchors, report, _, _ = setup
    loaded = AnchorSpace.load(anchors.save(tmp_path / "a.safetensors"))
    np.testing.assert_array_equal(loaded.basis, anchors.basis)
    np.testing.assert_array_equal(loaded.refusal.weight, anchors.refusal.weight)
    assert loaded.harmfulness.bias == anchors.harmfulness.bias and loaded.num_components == 4
    assert loaded.metadata["report"] == json.loads(json.dumps(report))
    assert set(report["refusal"]) >= {"accuracy", "auc", "bce"}


def _full_batch(data):
    return jax.tree.map(jnp.asarray, data.rows(np.arange(len(data)), np.ones(len(data), np.float32)))


def test_loss_at_the_initial_prompt(setup):
    """The soft prompt starts as the prompt's own embeddings: nothing has moved yet."""
    model, anchors, _, initial, data = setup
    total, metrics = dro_loss(jnp.asarray(initial), _full_batch(data), frozen_inputs(model, anchors), model.config)
    np.testing.assert_allclose(metrics["refusal"], np.log(2), atol=1e-5)
    np.testing.assert_allclose(metrics["harmfulness"], np.log(2), atol=1e-5)
    assert float(metrics["norm"]) < 1e-8
    np.testing.assert_allclose(total, np.log(2) * 1.01, atol=1e-5)


def test_norm_term_equals_the_full_basis_form_and_ablations_drop_terms(setup):
    model, anchors, _, initial, data = setup
    soft = jnp.asarray(initial) + 0.05 * jax.random.normal(jax.random.key(0), initial.shape)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors)
    _, metrics = dro_loss(soft, batch, frozen, model.config)
    new = np.asarray(final_states(model.params, model.config, batch.token_ids, batch.attention_mask, soft, batch.soft_offsets))
    rest = (new - data.base_states) @ anchors.basis[:, anchors.num_components :]
    np.testing.assert_allclose(metrics["norm"], np.mean(rest**2), rtol=1e-4)
    weights = LossWeights().ablate("norm", "refusal")
    total, _ = dro_loss(soft, batch, frozen, model.config, weights)
    np.testing.assert_allclose(total, 1e-2 * metrics["harmfulness"], rtol=1e-6)
    with pytest.raises(ValueError):
        LossWeights().ablate("accuracy")


def test_training_lowers_the_loss_and_only_moves_the_prompt(setup, tmp_path):
    model, anchors, _, initial, data = setup
    before = jax.tree.map(np.asarray, model.params)
    # Full batch and a small step: the tiny model's embeddings are only 0.02 in scale.
    config = TrainConfig(epochs=10, batch_size=12, learning_rate=1e-4, checkpoint_every=100)
    result = train_soft_prompt(model, data, anchors, initial, config, tmp_path / "ck", tmp_path / "m.jsonl", progress=False)
    batch, frozen = _full_batch(data), frozen_inputs(model, anchors)
    start, _ = dro_loss(jnp.asarray(initial), batch, frozen, model.config)
    end, _ = dro_loss(jnp.asarray(result.soft_prompt), batch, frozen, model.config)
    assert float(end) < float(start) - 1e-4, (float(start), float(end))
    assert result.steps == 10 and len(result.metrics) == 10
    assert [json.loads(line)["step"] for line in (tmp_path / "m.jsonl").read_text().splitlines()] == list(range(1, 11))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, model.params), before)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    model, anchors, _, initial, data = setup
    reference = jnp.asarray(initial)

    def breaks_after_one_step(soft_prompt, batch, frozen):
        total, metrics = dro_loss(soft_prompt, batch, frozen, model.config)
        moved = jnp.any(soft_prompt != reference)
        return jnp.where(moved, jnp.nan, total), metrics

    with pytest.raises(DroJaxError, match="last good checkpoint is step 1"):
        train_soft_prompt(model, data, anchors, initial, TRAIN, tmp_path / "ck", progress=False, loss_fn=breaks_after_one_step)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["1"]


def test_resume_refuses_a_checkpoint_of_another_model(setup, tmp_path):
    from helpers import save_tiny_model

    model, anchors, _, initial, data = setup
    train_soft_prompt(model, data, anchors, initial, TRAIN, tmp_path / "ck", progress=False)
    save_tiny_model("llama", tmp_path / "other", seed=1)  # same sizes and tokenizer, other weights
    other = load_model(tmp_path / "other", progress=False)
    with pytest.raises(DroJaxError, match="another model"):
        train_soft_prompt(other, data, anchors, initial, TRAIN, tmp_path / "ck", resume=True, progress=False)
    with pytest.raises(DroJaxError, match="--resume"):
        train_soft_prompt(model, data, anchors, initial, TRAIN, tmp_path / "ck", progress=False)


SHARDING_SCRIPT = """
import json, sys
import jax, numpy as np
sys.path.insert(0, {tests!r})
from dro_jax.anchors import AnchorSpace
from dro_jax.loading import load_model
from dro_jax.sharding import data_mesh
from dro_jax.soft_prompt import initial_soft_prompt
from dro_jax.train import TrainConfig, prepare_training_set, train_soft_prompt
assert len(jax.devices()) == 4
model = load_model({model!r}, progress=False)
anchors = AnchorSpace.load({anchors!r})
initial = initial_soft_prompt(model.params, model.tokenizer, "short")
data = prepare_training_set(model, {harmful!r}, {harmless!r}, "short", len(initial), progress=False)
config = TrainConfig(epochs=2, batch_size=5, learning_rate=1e-2, checkpoint_every=100)
results = []
for count in (1, 4):
    mesh = data_mesh(jax.devices()[:count])
    out = train_soft_prompt(model, data, anchors, initial, config, {tmp!r} + f"/ck{{count}}", progress=False, mesh=mesh)
    results.append(out)
np.save({tmp!r} + "/one.npy", results[0].soft_prompt)
np.save({tmp!r} + "/four.npy", results[1].soft_prompt)
print(json.dumps([[m["loss"] for m in r.metrics] for r in results]))
"""


def test_four_devices_give_the_single_device_result(setup, tiny_model_dir, tmp_path):
    """Batch sharded over 4 forced host devices (5 rows padded to 8) against one device."""
    directory, _ = tiny_model_dir("llama")
    _, anchors, _, initial, _ = setup
    anchor_file = anchors.save(tmp_path / "anchors.safetensors")
    script = SHARDING_SCRIPT.format(
        tests=str(Path(__file__).parent), model=str(directory), anchors=str(anchor_file),
        harmful=HARMFUL, harmless=HARMLESS, tmp=str(tmp_path),
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one_losses, four_losses = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(four_losses, one_losses, rtol=1e-5)
    one, four = np.load(tmp_path / "one.npy"), np.load(tmp_path / "four.npy")
    assert np.abs(one - initial).max() > 1e-3  # it trained
    np.testing.assert_allclose(four, one, atol=1e-5, rtol=0)


def _train_args(directory, anchors, files, out, *extra):
    return [
        "train", "--model", str(directory), "--harmful", str(files[0]), "--harmless", str(files[1]),
        "--anchors", str(anchors), "--epochs", "20", "--batch-size", "4", "--lr", "1e-2", "--checkpoint-every", "1",
        "--out", str(out), *extra,
    ]


@pytest.fixture()
def query_files(tmp_path):
    harmful, harmless = tmp_path / "harmful.txt", tmp_path / "harmless.txt"
    harmful.write_text("\n".join(HARMFUL), encoding="utf-8")
    harmless.write_text("\n".join(HARMLESS), encoding="utf-8")
    return harmful, harmless


def test_resume_after_sigkill_ends_with_the_uninterrupted_prompt(setup, tiny_model_dir, tmp_path, query_files):
    directory, _ = tiny_model_dir("llama")
    anchors = setup[1].save(tmp_path / "anchors.safetensors")
    assert main(_train_args(directory, anchors, query_files, tmp_path / "straight")) == 0
    want = load_soft_prompt(tmp_path / "straight" / "soft_prompt.safetensors")

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "dro_jax.cli", *_train_args(directory, anchors, query_files, run)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "5").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "soft_prompt.safetensors").exists()  # it was stopped mid-run
    assert main(_train_args(directory, anchors, query_files, run)) == 2  # no silent restart over a run
    assert main(_train_args(directory, anchors, query_files, run, "--resume")) == 0
    np.testing.assert_array_equal(load_soft_prompt(run / "soft_prompt.safetensors"), want)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))

    exported = tmp_path / "export.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    np.testing.assert_array_equal(load_soft_prompt(exported), want)


def _fails(args, capsys, fragment):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_train_command_bad_input(setup, tiny_model_dir, tmp_path, query_files, capsys):
    directory, _ = tiny_model_dir("llama")
    anchors = setup[1].save(tmp_path / "anchors.safetensors")
    harmful, harmless = query_files
    short = tmp_path / "short.txt"
    short.write_text("\n".join(HARMLESS[:3]), encoding="utf-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    _fails(_train_args(directory, anchors, (harmful, short), tmp_path / "a"), capsys, "must be the same size")
    _fails(_train_args(directory, anchors, (empty, harmless), tmp_path / "b"), capsys, "empty")
    _fails(_train_args(directory, anchors, query_files, tmp_path / "c", "--batch-size", "13"), capsys, "larger than the 12 training queries")
    wrong = AnchorSpace(np.zeros(8, np.float32), np.eye(8, dtype=np.float32), 4, setup[1].refusal, setup[1].harmfulness, {})
    _fails(_train_args(directory, wrong.save(tmp_path / "wrong.safetensors"), query_files, tmp_path / "d"), capsys, "8 wide")
    _fails(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.safetensors")], capsys, "no such checkpoint directory")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_run_directory_refuses_other_settings(setup, tiny_model_dir, tmp_path, query_files, capsys):
    directory, _ = tiny_model_dir("llama")
    anchors = setup[1].save(tmp_path / "anchors.safetensors")
    run = tmp_path / "run"
    args = _train_args(directory, anchors, query_files, run)
    args[args.index("--epochs") + 1] = "1"
    assert main(args) == 0
    args[args.index("--lr") + 1] = "0.5"
    _fails(args + ["--resume"], capsys, "different settings (lr)")
    _fails(_train_args(directory, anchors, query_files, tmp_path / "w", "--loss-weights", "1", "-1", "0"), capsys, "non-negative")


def test_prompt_tuning_loss_is_likelihood_and_unlikelihood(setup):
    from dro_jax.dro_loss import prompt_tuning_loss
    from dro_jax.models import forward
    from dro_jax.prompt_tuning import prepare_response_set

    model, _, _, initial, _ = setup
    responses = prepare_response_set(model, HARMFUL[:2], HARMLESS[:2], "short", len(initial), num_samples=2, max_response_tokens=6, progress=False)
    assert len(responses) == 8 and responses.response_mask.sum(axis=1).max() <= 6
    batch = jax.tree.map(jnp.asarray, responses.rows(np.arange(8), np.ones(8, np.float32)))
    total, metrics = prompt_tuning_loss(jnp.asarray(initial), batch, frozen_inputs(model, None), model.config)
    # By hand, from the plain forward pass: the soft prompt equals the prompt's own embeddings here.
    from dro_jax.soft_prompt import input_embeddings

    embeds = input_embeddings(model.params, batch.token_ids, jnp.asarray(initial), batch.soft_offsets)
    logits = np.asarray(forward(model.params, model.config, inputs_embeds=embeds, attention_mask=batch.attention_mask, output_logits=True).logits)
    log_p = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    per_sequence = []
    for row in range(8):
        scored = np.nonzero(responses.response_mask[row, 1:])[0]
        token_log_p = np.array([log_p[row, i, responses.token_ids[row, i + 1]] for i in scored])
        losses = -token_log_p if responses.wanted[row] else -np.log1p(-np.exp(token_log_p))
        per_sequence.append(losses.mean())
    np.testing.assert_allclose(total, np.mean(per_sequence), rtol=1e-5)
    assert set(metrics) == {"loss", "likelihood", "unlikelihood"}


def test_baseline_and_evaluate_commands(setup, tiny_model_dir, tmp_path, query_files):
    directory, _ = tiny_model_dir("llama")
    run = tmp_path / "pt"
    args = ["train", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
            "--baseline", "prompt-tuning", "--num-samples", "1", "--response-tokens", "8", "--epochs", "1", "--batch-size", "4", "--out", str(run)]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and "likelihood" in metrics[0]
    anchors = setup[1].save(tmp_path / "anchors.safetensors")
    out = tmp_path / "eval.md"
    assert main(["evaluate", "--model", str(directory), "--harmful", str(query_files[0]), "--harmless", str(query_files[1]),
                 "--settings", "none", "short", "--soft-prompt", str(run / "soft_prompt.safetensors"), "--anchors", str(anchors),
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [(r["setting"], r["dataset"]) for r in rows][:3] == [("none", "harmful"), ("short", "harmful"), (f"soft:{run / 'soft_prompt.safetensors'}", "harmful")]
    assert rows[0]["compliance_shift"] == 0 and all(r["num_queries"] == 6 for r in rows)
    assert out.read_text().count("\n") == 2 + len(rows)
