"""Parity of dro-jax with transformers/PyTorch on the same weights: the figures, and the float32 tolerances they must meet.

Two levels, each computed by one pure function that returns a dataclass of
figures and asserts nothing, so the tests, `python -m dro_jax.bench parity`
and `dro-jax compare-torch` share one implementation:

* `model_parity`: each prompt alone through both models (every layer's input,
  the final-norm states, the logits and the next-token distributions);
* `dro_parity`: the DRO loss, its gradient with respect to the soft prompt and
  one clip + AdamW step, against `dro_jax.parity.torch_dro` at a `DroCase` (a
  batch, a soft prompt moved away from its initial prompt, an anchor space).

`model_checks` and `dro_checks` hold the figures to their tolerances. torch is
imported inside the functions, as in `torch_dro`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_jax.anchors.space import AnchorSpace, LinearProbe
from dro_jax.common.tables import markdown_table
from dro_jax.data.queries import QueryPairs, everyday_queries
from dro_jax.dro.loss import LossWeights, QueryBatch, dro_objective
from dro_jax.dro.soft_prompt import initial_soft_prompt
from dro_jax.dro.train import TrainConfig, frozen_inputs, make_optimizer
from dro_jax.dro.training_set import prepare_training_set
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.refusal_score import OpeningReadout, Openings
from dro_jax.loading import LoadedModel
from dro_jax.models import forward
from dro_jax.models.inputs import SharedPrefix
from dro_jax.parity.torch_dro import apply_gradients, make_torch_optimizer, soft_prompt_states, torch_dro_loss

INIT_PROMPT = "short"  # the training default: the soft prompt starts from this safety prompt's embeddings
# float32 tolerances. Measured on SmolLM2-135M (30 layers): layer error 1.7e-5, logits 1.7e-4, min cosine 0.9999998.
LAYER_RTOL = 1e-4  # max |diff| / max |value| of a layer's input or the final-norm states
MIN_COSINE = 0.9999
LOGIT_ATOL = 1e-3
MAX_KL = 1e-6  # nats; a logit error e moves the KL by about e^2 / 2
LOSS_RTOL = 1e-5
GRAD_MIN_COSINE = 0.9999
GRAD_RTOL = 1e-3  # |g_jax - g_torch| / |g_torch|
STEP_ATOL = 1e-6
STEP_MAX_FRACTION_OFF = 0.01  # elements whose gradient is within float32 noise of zero may take the other sign
WELL_CONDITIONED = 1e-3  # |g| above this fraction of the gradient's RMS: Adam's first step, lr * g / |g|, is then stable


@dataclasses.dataclass(frozen=True, eq=False)
class ModelParity:
    """Worst cases over prompts, each run alone in float32."""

    num_sequences: int
    positions: int
    layer_error: np.ndarray  # [layers] max |diff| / max |value| of each layer's input
    final_error: float  # the same for the final-norm states
    min_cosine: float  # of the final-norm states, over all positions
    logit_error: float  # max |diff|
    max_kl: float  # KL(transformers || dro-jax) of the next-token distribution, worst position
    top1_last: int  # prompts whose next token (last position) agrees
    top1_all: int  # positions whose argmax agrees


@dataclasses.dataclass(frozen=True, eq=False)
class DroCase:
    """Where the DRO loss is compared: a batch, a soft prompt away from its initial prompt, an anchor space."""

    init: np.ndarray  # [N, h] the initial prompt's embeddings (the base states are taken under it)
    prompt: np.ndarray  # [N, h]
    batch: QueryBatch  # of numpy arrays: the rows' own parts
    prefix: SharedPrefix | None  # what every row starts with
    anchors: AnchorSpace


@dataclasses.dataclass(frozen=True)
class DroParity:
    """dro-jax against PyTorch at one `DroCase`; gradients and steps compared elementwise over the prompt."""

    metrics: dict[str, float]  # PyTorch's loss terms
    metric_diffs: dict[str, float]  # |dro-jax - PyTorch| per term
    loss_rel_diff: float
    grad_cosine: float
    grad_rel_diff: float  # |g_jax - g_torch| / |g_torch|
    grad_norm: float  # PyTorch's, before clipping
    optimizer_diff: float  # optax fed PyTorch's gradient vs torch's clip + AdamW: the optimizers alone
    step_diff: float  # max |diff| of the stepped prompts
    step_diff_well_conditioned: float  # the same over elements with |g| above WELL_CONDITIONED x RMS
    well_conditioned_fraction: float
    step_fraction_off: float  # elements whose stepped values differ by more than STEP_ATOL
    step_size: float  # max |move| of the prompt in dro-jax's step
    base_rel_diff: float  # base states (dro-jax, prompt as tokens) vs PyTorch (prompt as soft rows), relative


@dataclasses.dataclass(frozen=True)
class Check:
    """One line of the table: a figure against its tolerance."""

    name: str
    measured: str
    tolerance: str
    passed: bool


def parity_sequences(model: LoadedModel, count: int) -> list[list[int]]:
    """`count` chat-formatted everyday queries, the first half without a system prompt, the rest with the default one."""
    queries = everyday_queries(count)
    half = count // 2
    return encode_queries(model, queries[:half], None).sequences + encode_queries(model, queries[half:], "default").sequences


_forward = jax.jit(forward, static_argnames=("config", "output_hidden_states", "output_logits"))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _relative_error(ours: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(ours - want).max() / np.abs(want).max())


def model_parity(model: LoadedModel, torch_model, sequences: Sequence[Sequence[int]]) -> ModelParity:
    """Runs each sequence alone through dro-jax and the transformers model (both float32)."""
    import torch

    layers = model.config.num_layers
    layer_error = np.zeros(layers)
    final_error, logit_error, max_kl, min_cosine = 0.0, 0.0, 0.0, 1.0
    top1_last = top1_all = positions = 0
    for seq in sequences:
        ids = np.array([seq], np.int32)
        ours = _forward(model.params, model.config, ids, np.ones_like(ids), output_hidden_states=True, output_logits=True)
        with torch.inference_mode():
            theirs = torch_model(input_ids=torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        for i in range(layers):  # HF entry i is the input of layer i; the last one is after the final norm
            layer_error[i] = max(layer_error[i], _relative_error(np.asarray(ours.hidden_states[i][0]), theirs.hidden_states[i][0].numpy()))
        a, b = np.asarray(ours.last_hidden_state[0]), theirs.hidden_states[-1][0].numpy()
        final_error = max(final_error, _relative_error(a, b))
        min_cosine = min(min_cosine, float(((a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min()))
        ours_logits, their_logits = np.asarray(ours.logits[0]), theirs.logits[0].numpy()
        logit_error = max(logit_error, float(np.abs(ours_logits - their_logits).max()))
        log_p, log_q = _log_softmax(their_logits), _log_softmax(ours_logits)
        max_kl = max(max_kl, float((np.exp(log_p) * (log_p - log_q)).sum(-1).max()))
        top1_last += int(ours_logits[-1].argmax() == their_logits[-1].argmax())
        top1_all += int((ours_logits.argmax(-1) == their_logits.argmax(-1)).sum())
        positions += len(seq)
    return ModelParity(len(sequences), positions, layer_error, final_error, min_cosine, logit_error, max_kl, top1_last, top1_all)


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
    return AnchorSpace(base.mean(0).astype(np.float32), basis, num_components, probe(0.3), probe(-0.2), {"synthetic": "random basis and probes"})


def dro_case(
    model: LoadedModel, torch_model, pairs: QueryPairs, noise: float = 0.5, seed: int = 0,
    filler_row: bool = False, anchors: AnchorSpace | None = None, reply_tokens: int = 0,
) -> DroCase:
    """One batch of the paired queries, the short-prompt init plus `noise` x its std of Gaussian noise, so every term is live.

    Without `anchors`, a `random_anchor_space` (4 axes) around the batch's own
    base states. `filler_row` appends a weight-0 copy of row 0, as the training
    loop pads a short last batch. `reply_tokens`: the harmless rows' no-prompt
    replies, for the `replies` term (see `prepare_training_set`).
    """
    import torch

    init = initial_soft_prompt(model.params, model.tokenizer, INIT_PROMPT)
    data = prepare_training_set(model, pairs, INIT_PROMPT, init.shape[0], batching=Batching(progress=False), reply_tokens=reply_tokens)
    rng = np.random.default_rng(seed + 1)
    prompt = (init + noise * init.std() * rng.standard_normal(init.shape)).astype(np.float32)
    index = np.arange(len(data))
    if filler_row:
        index = np.concatenate([index, [0]])
    weights = np.ones(len(index), np.float32)
    weights[len(data) :] = 0
    batch = data.rows(index, weights)
    if anchors is None:
        with torch.no_grad():
            new = soft_prompt_states(torch_model, torch.from_numpy(prompt.copy()), batch, data.prefix).numpy()
        anchors = random_anchor_space(batch.base_states, new, 4, seed)
    return DroCase(init, prompt, batch, data.prefix, anchors)


def dro_parity(
    model: LoadedModel, torch_model, case: DroCase, weights: LossWeights = LossWeights(), refusal_score: str = "probe",
    openings: Openings = Openings(),
) -> DroParity:
    """Loss, gradient and one clip + AdamW step (`TrainConfig` defaults) on both sides; `torch_model` must be frozen."""
    import torch

    prompt = jnp.asarray(case.prompt)
    loss_fn = dro_objective(model.config, weights, refusal_score=refusal_score).loss
    (jax_loss, jax_metrics), jax_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        prompt, case.batch, frozen_inputs(model, case.anchors, case.prefix, openings)
    )
    optimizer = make_optimizer(TrainConfig())

    def optax_step(grad) -> np.ndarray:
        updates, _ = optimizer.update(grad, optimizer.init(prompt), prompt)
        return np.asarray(optax.apply_updates(prompt, updates))

    soft = torch.nn.Parameter(torch.from_numpy(case.prompt.copy()))
    readout = OpeningReadout.of(model.tokenizer, openings, model.config.vocab_size)
    torch_loss, torch_metrics = torch_dro_loss(torch_model, soft, case.batch, case.anchors, weights, case.prefix, refusal_score, readout)
    torch_loss.backward()
    metrics = {name: float(value.detach()) for name, value in torch_metrics.items()}
    a, b = np.asarray(jax_grad, np.float64), soft.grad.double().numpy()
    grad_norm = apply_gradients(soft, make_torch_optimizer(soft))
    torch_stepped = soft.detach().numpy()
    jax_stepped = optax_step(jax_grad)
    step_error = np.abs(jax_stepped - torch_stepped)
    well_conditioned = np.abs(b) > WELL_CONDITIONED * np.sqrt(np.mean(b**2))
    with torch.no_grad():
        torch_base = soft_prompt_states(torch_model, torch.from_numpy(case.init.copy()), case.batch, case.prefix).numpy()
    return DroParity(
        metrics=metrics,
        metric_diffs={name: abs(float(jax_metrics[name]) - value) for name, value in metrics.items()},
        loss_rel_diff=abs(float(jax_loss) - metrics["loss"]) / abs(metrics["loss"]),
        grad_cosine=float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)),
        grad_rel_diff=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
        grad_norm=grad_norm,
        optimizer_diff=float(np.abs(optax_step(jnp.asarray(b, jnp.float32)) - torch_stepped).max()),
        step_diff=float(step_error.max()),
        step_diff_well_conditioned=float(step_error[well_conditioned].max()),
        well_conditioned_fraction=float(well_conditioned.mean()),
        step_fraction_off=float(np.mean(step_error > STEP_ATOL)),
        step_size=float(np.abs(jax_stepped - case.prompt).max()),
        base_rel_diff=_relative_error(torch_base, np.asarray(case.batch.base_states)),
    )


def _at_most(name: str, value: float, limit: float, measured: str | None = None) -> Check:
    return Check(name, measured or f"{value:.2e}", f"<= {limit:.0e}", bool(value <= limit))


def _at_least(name: str, value: float, limit: float) -> Check:
    return Check(name, f"{value:.7f}", f">= {limit}", bool(value >= limit))


def model_checks(figures: ModelParity) -> list[Check]:
    """The model's figures against their float32 tolerances; the argmax must agree at every position."""
    worst = int(figures.layer_error.argmax())
    return [
        _at_most("model: hidden states entering each layer, worst max abs diff / max abs value", figures.layer_error[worst], LAYER_RTOL,
                 f"{figures.layer_error[worst]:.2e} (layer {worst})"),
        _at_most("model: final-norm states, max abs diff / max abs value", figures.final_error, LAYER_RTOL),
        _at_least("model: final-norm states, min cosine over all positions", figures.min_cosine, MIN_COSINE),
        _at_most("model: logits, max abs diff", figures.logit_error, LOGIT_ATOL),
        _at_most("model: next-token KL divergence of dro-jax from transformers, worst position", figures.max_kl, MAX_KL),
        Check("model: next token at the last position agrees", f"{figures.top1_last}/{figures.num_sequences}", "all",
              figures.top1_last == figures.num_sequences),
        Check("model: argmax agrees over all positions", f"{figures.top1_all}/{figures.positions}", "all", figures.top1_all == figures.positions),
    ]


def dro_checks(figures: DroParity) -> list[Check]:
    """Loss, gradient and step against their tolerances (the tests add stricter, case-specific ones)."""
    return [
        _at_most("DRO loss: relative difference", figures.loss_rel_diff, LOSS_RTOL),
        _at_least("gradient w.r.t. the soft prompt: cosine", figures.grad_cosine, GRAD_MIN_COSINE),
        _at_most("gradient: norm(g_jax - g_torch) / norm(g_torch)", figures.grad_rel_diff, GRAD_RTOL),
        _at_most(f"optimizer step (clip + AdamW): max abs diff of the new prompt where abs(g) > {WELL_CONDITIONED:.0e} x RMS "
                 f"({figures.well_conditioned_fraction:.1%} of elements)", figures.step_diff_well_conditioned, STEP_ATOL),
        Check(f"optimizer step: elements off by more than {STEP_ATOL:.0e}", f"{figures.step_fraction_off:.2%}",
              f"<= {STEP_MAX_FRACTION_OFF:.0%}", figures.step_fraction_off <= STEP_MAX_FRACTION_OFF),
    ]


def checks_table(checks: Sequence[Check]) -> str:
    rows = [[c.name, c.measured, c.tolerance, "pass" if c.passed else "FAIL"] for c in checks]
    return markdown_table(["check (float32)", "measured", "tolerance", "result"], rows)
