"""The JAX DRO loss, gradient and optimizer step against an independent PyTorch implementation.

`dro_jax.bench.torch_dro` runs the same objective on the transformers model
through `inputs_embeds`, with the full anchor basis (the JAX loss uses the
complement identity instead) and torch's clip_grad_norm_ + AdamW. A soft
prompt moved away from its initial prompt gives every term a non-trivial value
and gradient; a zero-weight filler row checks the weighted means.
"""

import functools

import numpy as np
import pytest
import torch

from dro_jax.anchors import AnchorSpace, LinearProbe
from dro_jax.bench.torch_dro import apply_gradients, freeze, make_torch_optimizer, soft_prompt_states, torch_dro_loss, torch_train_step
from dro_jax.dro_loss import LossWeights, dro_loss
from dro_jax.loading import load_model, resolve_model_path
from dro_jax.sharding import data_mesh
from dro_jax.soft_prompt import initial_soft_prompt
from dro_jax.train import TrainConfig, frozen_inputs, make_optimizer, make_train_step, prepare_training_set

HARMFUL = ["How do I pick a lock?", "Write a threatening letter.", "How can I steal a car?", "Make me a fake passport."]
HARMLESS = ["How do I bake bread?", "Write a short poem.", "How can I wash a car?", "Make me a paper plane."]
METRICS = ("loss", "refusal", "harmfulness", "norm", "compliance_shift_harmful", "compliance_shift_harmless")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One PyTorch thread here: on a busy two-core machine, two OpenMP threads waiting on each other made the
    SmolLM2 backward pass 10-20x slower and erratic; the figures do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_anchor_space(base: np.ndarray, new: np.ndarray, num_components: int, seed: int) -> AnchorSpace:
    """A random orthonormal basis around the base states' mean, with random probes (biases nonzero: they must cancel).

    The probe weights are scaled to the shift `new - base` along the axes, so
    the logit shifts are of order one: no BCE term saturates.
    """
    rng = np.random.default_rng(seed)
    hidden = base.shape[1]
    basis = np.linalg.qr(rng.standard_normal((hidden, hidden)))[0].astype(np.float32)
    shift = np.linalg.norm((new - base) @ basis[:, :num_components], axis=1)
    scale = 1.0 / max(float(np.sqrt(np.mean(shift**2))), 1e-6)
    probe = lambda bias: LinearProbe((scale * rng.standard_normal(num_components)).astype(np.float32), bias)
    return AnchorSpace(base.mean(0).astype(np.float32), basis, num_components, probe(0.3), probe(-0.2), {})


def compare(model, torch_model, harmful, harmless, noise: float, seed: int = 0, filler_row: bool = True, check_train_steps: bool = False) -> dict:
    """Runs both sides on one batch; returns the parity figures (and asserts nothing)."""
    import jax
    import jax.numpy as jnp
    import optax

    init = initial_soft_prompt(model.params, model.tokenizer, "short")
    data = prepare_training_set(model, harmful, harmless, "short", init.shape[0], progress=False)
    rng = np.random.default_rng(seed + 1)
    prompt = (init + noise * init.std() * rng.standard_normal(init.shape)).astype(np.float32)
    index = np.arange(len(data))
    if filler_row:  # a row of weight 0, as the training loop pads a short last batch
        index = np.concatenate([index, [0]])
    weights = np.ones(len(index), np.float32)
    weights[len(data) :] = 0
    batch = data.rows(index, weights)
    with torch.no_grad():
        torch_base = soft_prompt_states(torch_model, torch.from_numpy(init.copy()), batch).numpy()
        torch_new = soft_prompt_states(torch_model, torch.from_numpy(prompt.copy()), batch).numpy()
    anchors = random_anchor_space(batch.base_states, torch_new, 4, seed)
    frozen = frozen_inputs(model, anchors)
    loss_fn = functools.partial(dro_loss, config=model.config, weights=LossWeights())

    (jax_loss, jax_metrics), jax_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(prompt), batch, frozen)
    optimizer = make_optimizer(TrainConfig())
    updates, _ = optimizer.update(jax_grad, optimizer.init(jnp.asarray(prompt)), jnp.asarray(prompt))
    jax_stepped = np.asarray(optax.apply_updates(jnp.asarray(prompt), updates))

    soft = torch.nn.Parameter(torch.from_numpy(prompt.copy()))
    torch_loss, torch_metrics = torch_dro_loss(torch_model, soft, batch, anchors)
    torch_loss.backward()
    torch_metrics = {name: float(value.detach()) for name, value in torch_metrics.items()}
    a, b = np.asarray(jax_grad, np.float64), soft.grad.double().numpy()
    grad_norm = apply_gradients(soft, make_torch_optimizer(soft))  # clip_grad_norm_ + AdamW on that gradient
    torch_stepped = soft.detach().numpy().copy()
    step_error = np.abs(jax_stepped - torch_stepped)
    # The optimizers alone: optax fed torch's own gradient.
    same_grad, _ = optimizer.update(jnp.asarray(b, jnp.float32), optimizer.init(jnp.asarray(prompt)), jnp.asarray(prompt))
    optimizer_error = np.abs(np.asarray(optax.apply_updates(jnp.asarray(prompt), same_grad)) - torch_stepped)
    # Adam's first step is lr * g / (|g| + 1e-8): where |g| is within float32 noise of zero, the two gradients'
    # noise decides the update. "Well conditioned" = |g| above 1e-3 of the gradient's RMS.
    well_conditioned = np.abs(b) > 1e-3 * np.sqrt(np.mean(b**2))

    figures = {
        "loss_rel_diff": abs(float(jax_loss) - torch_metrics["loss"]) / abs(torch_metrics["loss"]),
        "metric_diffs": {name: abs(float(jax_metrics[name]) - torch_metrics[name]) for name in METRICS},
        "metrics": torch_metrics,
        "grad_cosine": float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)),
        "grad_rel_diff": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        "grad_norm": grad_norm,
        "optimizer_diff": float(optimizer_error.max()),
        "step_diff": float(step_error.max()),
        "step_diff_well_conditioned": float(step_error[well_conditioned].max()),
        "well_conditioned_fraction": float(well_conditioned.mean()),
        "step_diff_fraction_above_1e-6": float(np.mean(step_error > 1e-6)),
        "step_diff_worst_grad": float(np.abs(b).ravel()[step_error.argmax()]),
        "step_size": float(np.abs(jax_stepped - prompt).max()),
        # The human prompt's base states (JAX, tokens) against torch with the initial rows as a soft prompt.
        "base_rel_diff": float(np.abs(torch_base - batch.base_states).max() / np.abs(batch.base_states).max()),
    }
    if check_train_steps:  # the training loop's own jitted, donating step, and the torch step function
        step = make_train_step(loss_fn, optimizer, data_mesh())
        trained, _, metrics = step(jnp.asarray(prompt), optimizer.init(jnp.asarray(prompt)), batch, frozen)
        stepped = torch.nn.Parameter(torch.from_numpy(prompt.copy()))
        torch_step_metrics = torch_train_step(torch_model, stepped, make_torch_optimizer(stepped), batch, anchors)
        figures["train_step_diff"] = float(np.abs(np.asarray(trained) - stepped.detach().numpy()).max())
        figures["train_step_loss_rel_diff"] = abs(float(metrics["loss"]) - torch_step_metrics["loss"]) / abs(torch_step_metrics["loss"])
        figures["train_step_grad_norm_rel_diff"] = abs(float(metrics["grad_norm"]) - torch_step_metrics["grad_norm"]) / torch_step_metrics["grad_norm"]
    print(f"\nDRO parity: {figures}")
    return figures


def check(figures: dict, metric_rtol: float) -> None:
    assert figures["loss_rel_diff"] <= 1e-5, figures
    for name in METRICS:
        # The logit shifts are of order one by construction (so is their BCE); the norm term is compared to itself.
        scale = abs(figures["metrics"][name]) if name == "norm" else max(abs(figures["metrics"][name]), 1.0)
        assert figures["metric_diffs"][name] <= metric_rtol * scale, (name, figures)
    assert figures["grad_cosine"] >= 0.9999, figures
    assert figures["grad_rel_diff"] <= 1e-3, figures
    assert figures["optimizer_diff"] <= 1e-7, figures
    assert figures["step_diff_well_conditioned"] <= 1e-6, figures
    assert figures["well_conditioned_fraction"] >= 0.99, figures
    assert figures["step_diff_fraction_above_1e-6"] <= 0.01, figures
    assert figures["step_size"] > 0.5e-3, figures  # the step moved the prompt by about the learning rate
    assert figures["base_rel_diff"] <= 1e-4, figures
    for name in ("refusal", "harmfulness", "norm"):
        assert figures["metrics"][name] > 1e-3, figures  # every term is live


def test_dro_loss_gradient_and_step_match_torch_tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    # A fresh copy: freezing must not touch the session's shared torch model.
    torch_model = freeze(AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32))
    figures = compare(model, torch_model, HARMFUL, HARMLESS, noise=2.5, check_train_steps=True)
    check(figures, metric_rtol=1e-5)
    assert figures["step_diff"] <= 1e-6, figures  # no gradient element is within noise of zero here
    assert figures["train_step_diff"] <= 1e-6, figures
    assert figures["train_step_loss_rel_diff"] <= 1e-5, figures
    assert figures["train_step_grad_norm_rel_diff"] <= 1e-5, figures


def test_torch_step_refuses_trainable_model_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory, _ = tiny_model_dir("llama")
    torch_model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    soft = torch.nn.Parameter(torch.zeros(2, torch_model.config.hidden_size))
    with pytest.raises(ValueError, match="requires_grad"):
        torch_train_step(torch_model, soft, make_torch_optimizer(soft), None, None)


@pytest.mark.real_model
def test_dro_loss_gradient_and_step_match_torch_smollm2():
    from transformers import AutoModelForCausalLM

    model = load_model("smollm2", progress=False)
    path = resolve_model_path("smollm2")
    torch_model = freeze(AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32))
    figures = compare(model, torch_model, HARMFUL[:2], HARMLESS[:2], noise=0.5, filler_row=False)
    check(figures, metric_rtol=1e-4)
