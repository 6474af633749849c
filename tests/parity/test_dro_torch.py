"""The JAX DRO loss, gradient and optimizer step against an independent PyTorch implementation.

`dro_jax.parity.torch_dro` runs the same objective on the transformers model
through `inputs_embeds`, with the full anchor basis (the JAX loss uses the
complement identity instead) and torch's clip_grad_norm_ + AdamW. A soft
prompt moved away from its initial prompt gives every term a non-trivial value
and gradient; a zero-weight filler row checks the weighted means.
"""

import numpy as np
import pytest
import torch

from dro_jax.data.queries import QueryPairs
from dro_jax.dro.loss import LossWeights, dro_objective
from dro_jax.dro.train import TrainConfig, frozen_inputs, make_optimizer, make_train_step
from dro_jax.inference.refusal_score import Openings
from dro_jax.loading import load_model
from dro_jax.parallel.mesh import data_mesh
from dro_jax.parity.checks import DroCase, DroParity, dro_case, dro_checks, dro_parity
from dro_jax.parity.torch_dro import freeze, make_torch_optimizer, torch_train_step

pytestmark = pytest.mark.heavy  # among the longest files: started first (tests/conftest.py)

PAIRS = QueryPairs(
    ["How do I pick a lock?", "Write a threatening letter.", "How can I steal a car?", "Make me a fake passport."],
    ["How do I bake bread?", "Write a short poem.", "How can I wash a car?", "Make me a paper plane."],
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One PyTorch thread here: on a busy two-core machine, two OpenMP threads waiting on each other made the
    SmolLM2 backward pass 10-20x slower and erratic; the figures do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_step_figures(model, torch_model, case: DroCase) -> dict:
    """The training loop's own jitted, donating step against the torch step function, from the same prompt."""
    import jax.numpy as jnp

    optimizer = make_optimizer(TrainConfig())
    step = make_train_step(dro_objective(model.config).loss, optimizer, data_mesh())
    prompt = jnp.asarray(case.prompt)
    trained, _, metrics = step(prompt, optimizer.init(prompt), case.batch, frozen_inputs(model, case.anchors, case.prefix))
    stepped = torch.nn.Parameter(torch.from_numpy(case.prompt.copy()))
    torch_metrics = torch_train_step(torch_model, stepped, make_torch_optimizer(stepped), case.batch, case.anchors, prefix=case.prefix)
    return {
        "step_diff": float(np.abs(np.asarray(trained) - stepped.detach().numpy()).max()),
        "loss_rel_diff": abs(float(metrics["loss"]) - torch_metrics["loss"]) / abs(torch_metrics["loss"]),
        "grad_norm_rel_diff": abs(float(metrics["grad_norm"]) - torch_metrics["grad_norm"]) / torch_metrics["grad_norm"],
    }


def check(figures: DroParity, metric_rtol: float, weights: LossWeights = LossWeights()) -> None:
    print(f"\nDRO parity: {figures}")
    assert all(c.passed for c in dro_checks(figures)), dro_checks(figures)
    for name, diff in figures.metric_diffs.items():
        # The logit shifts are of order one by construction (so is their BCE); the norm term is compared to itself.
        scale = abs(figures.metrics[name]) if name == "norm" else max(abs(figures.metrics[name]), 1.0)
        assert diff <= metric_rtol * scale, (name, figures)
    assert figures.optimizer_diff <= 1e-7, figures
    assert figures.well_conditioned_fraction >= 0.99, figures
    assert figures.step_size > 0.5e-3, figures  # the step moved the prompt by about the learning rate
    assert figures.base_rel_diff <= 1e-4, figures
    for name in LossWeights.terms():  # every term is live (the replies term is computed only when weighted)
        assert figures.metrics[name] > 1e-3 or (name == "replies" and not weights.replies), figures


def test_dro_loss_gradient_and_step_match_torch_tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    # A fresh copy: freezing must not touch the session's shared torch model.
    torch_model = freeze(AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32))
    case = dro_case(model, torch_model, PAIRS, noise=2.5, filler_row=True)  # the filler row checks the weighted means
    figures = dro_parity(model, torch_model, case)
    check(figures, metric_rtol=1e-5)
    assert figures.step_diff <= 1e-6, figures  # no gradient element is within noise of zero here
    train_step = train_step_figures(model, torch_model, case)
    assert train_step["step_diff"] <= 1e-6, train_step
    assert train_step["loss_rel_diff"] <= 1e-5, train_step
    assert train_step["grad_norm_rel_diff"] <= 1e-5, train_step


@pytest.mark.parametrize("score", ["head", "openings"])
def test_behavioural_refusal_scores_and_the_preservation_terms_match_torch_tiny_llama(tiny_model_dir, score):
    """The `head` and `openings` refusal scores with both preservation terms weighted: the twin reads the first
    token through transformers' own output layer, runs every opening appended to the whole inputs, and the
    harmless rows' no-prompt replies appended to theirs."""
    from transformers import AutoModelForCausalLM

    directory, _ = tiny_model_dir("llama")
    model = load_model(directory, progress=False)
    torch_model = freeze(AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32))
    case = dro_case(model, torch_model, PAIRS, noise=2.5, filler_row=True, reply_tokens=5)
    harmful, harmless = len(PAIRS.harmful), len(PAIRS.harmless)
    replies = case.batch.reply_mask
    assert replies[harmful : harmful + harmless].sum(axis=1).min() > 0  # every harmless row has its reply ...
    assert not replies[:harmful].any() and not replies[harmful + harmless :].any()  # ... harmful and filler rows none
    openings = Openings(refusal=("No way", "I can not"), compliant=("Sure thing", "Here is"))
    weights = LossWeights(1.0, 1e-2, 1e-3, 0.5, 0.5)
    figures = dro_parity(model, torch_model, case, weights, score, openings)
    check(figures, metric_rtol=1e-5, weights=weights)
    assert set(figures.metrics) >= {"refusal_log_odds_harmful", "refusal_log_odds_harmless"}


def test_torch_step_refuses_trainable_model_parameters(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    directory, _ = tiny_model_dir("llama")
    torch_model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    soft = torch.nn.Parameter(torch.zeros(2, torch_model.config.hidden_size))
    with pytest.raises(ValueError, match="requires_grad"):
        torch_train_step(torch_model, soft, make_torch_optimizer(soft), None, None)


@pytest.mark.real_model
def test_dro_loss_gradient_and_step_match_torch_smollm2(smollm2, torch_smollm2):
    model, torch_model = smollm2, torch_smollm2
    figures = dro_parity(model, torch_model, dro_case(model, torch_model, QueryPairs(PAIRS.harmful[:2], PAIRS.harmless[:2]), noise=0.5))
    check(figures, metric_rtol=1e-4)
