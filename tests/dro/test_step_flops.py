"""The throughput figures of training: each step's model FLOPs (`Objective.step_flops`) against the matmuls its
program holds, and the model FLOP utilisation against a chip's datasheet peak."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import QUIET

from dro_jax.dro.loss import LossWeights, dro_objective
from dro_jax.dro.train import frozen_inputs, step_throughput
from dro_jax.dro.training_set import prepare_training_set
from dro_jax.inference.refusal_score import Openings
from dro_jax.parallel.chips import bfloat16_peak_tflops

# Openings of several tokens, so that the openings score runs its tree of continuations.
OPENINGS = Openings(refusal=("No, I cannot",), compliant=("Sure, here is",))


def _matmul_flops(jaxpr) -> float:
    """2 x the multiply-adds of every dot_general in `jaxpr`, a scan's body once per iteration."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
        elif eqn.primitive.name == "scan":
            total += eqn.params["length"] * _matmul_flops(eqn.params["jaxpr"].jaxpr)
        elif eqn.primitive.name == "cond":
            total += max(_matmul_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            for sub in (eqn.params.get(key) for key in ("jaxpr", "call_jaxpr", "fun_jaxpr")):
                if sub is not None:
                    total += _matmul_flops(getattr(sub, "jaxpr", sub))
    return total


@pytest.mark.parametrize("score, replies", [("probe", 0.0), ("openings", 0.0), ("probe", 1.0)])
def test_step_flops_count_the_matmuls_of_the_step(tiny_dro, score, replies):
    """Within 12% below the dot_generals of the step's program (value and gradient): the program scores whole key
    blocks in attention where the count takes the causal pairs only. Forgetting the backward, the openings' tree
    or the replies' pass falls far outside."""
    model = tiny_dro.model
    data = prepare_training_set(model, tiny_dro.pairs, "short", len(tiny_dro.initial), batching=QUIET, openings=OPENINGS,
                                reply_tokens=8 if replies else 0)
    frozen = frozen_inputs(model, tiny_dro.anchors, data.prefix, OPENINGS)
    batch = data.rows(np.arange(len(data)), np.ones(len(data), np.float32))
    # Every position real: the program computes the padded ones too, the count only real tokens.
    batch = batch._replace(attention_mask=np.ones_like(batch.attention_mask), reply_mask=np.ones_like(batch.reply_mask))
    objective = dro_objective(model.config, LossWeights(replies=replies), refusal_score=score)
    step = jax.make_jaxpr(jax.value_and_grad(objective.loss, has_aux=True))(jnp.asarray(tiny_dro.initial), batch, frozen)
    assert 0.88 < objective.step_flops(batch, frozen) / _matmul_flops(step.jaxpr) < 1.0


def test_utilisation_is_read_against_a_known_chips_bfloat16_peak():
    h100, cpu = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3"), types.SimpleNamespace(platform="cpu", device_kind="cpu")
    assert bfloat16_peak_tflops("bfloat16", h100) == 989.0
    assert bfloat16_peak_tflops("float32", h100) is None and bfloat16_peak_tflops("bfloat16", cpu) is None
    batch = types.SimpleNamespace(attention_mask=np.ones((3, 4)), weights=np.array([1.0, 1.0, 0.0]))  # a filler row
    figures = step_throughput(0.5, batch, 4.945e14, 989.0)
    assert figures["tokens_per_second"] == 16 and figures["model_tflop_per_second"] == pytest.approx(989.0)
    assert figures["mfu"] == pytest.approx(1.0) and "mfu" not in step_throughput(0.5, batch, 1e12, None)
