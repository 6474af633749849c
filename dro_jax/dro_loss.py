"""The DRO objective and the vanilla prompt-tuning baseline, as pure functions of the soft prompt.

For each training query, `base` is its representation under the human prompt
the soft prompt started from (fixed) and `new` its representation under the
soft prompt. With y = 0 for harmful and 1 for harmless queries and f_r, f_h the
refusal and harmfulness probes on the leading anchor coordinates:

    refusal     = BCE_with_logits(f_r(new) - f_r(base), y)
    harmfulness = BCE_with_logits(f_h(new) - f_h(base), y)
    norm        = mean over the hidden - k remaining coordinates of (new - base)^2
    total       = w_r * refusal + w_h * harmfulness + w_n * norm   (1, 1e-2, 1e-3)

The remaining coordinates are the orthonormal completion of the PCA axes, so
their squared length is |new - base|^2 - |(new - base) @ axes|^2: the loss
never multiplies by the full hidden x hidden basis.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, compute_logits, forward
from dro_jax.represent import final_states
from dro_jax.soft_prompt import input_embeddings


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Term weights; an ablation sets one to zero."""

    refusal: float = 1.0
    harmfulness: float = 1e-2
    norm: float = 1e-3

    def ablate(self, *terms: str) -> "LossWeights":
        unknown = set(terms) - {"refusal", "harmfulness", "norm"}
        if unknown:
            raise ValueError(f"unknown loss terms: {sorted(unknown)}")
        return dataclasses.replace(self, **{term: 0.0 for term in terms})


class Frozen(NamedTuple):
    """Everything the loss reads but never trains."""

    params: Params
    mean: jax.Array  # [h]
    components: jax.Array  # [h, k] PCA axes
    refusal_weight: jax.Array  # [k]
    harmfulness_weight: jax.Array  # [k]


class QueryBatch(NamedTuple):
    """Left-padded chat inputs with the soft prompt's slot, base states and targets; weight 0 marks a filler row."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_offsets: jax.Array  # [b]
    base_states: jax.Array  # [b, h]
    harmless: jax.Array  # [b] 1 = harmless, 0 = harmful
    weights: jax.Array  # [b]


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def dro_loss(
    soft_prompt: jax.Array,
    batch: QueryBatch,
    frozen: Frozen,
    config: ModelConfig,
    weights: LossWeights = LossWeights(),
    remat: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics). Bind `config`, `weights` and `remat` with functools.partial for jit/grad."""
    new = final_states(frozen.params, config, batch.token_ids, batch.attention_mask, soft_prompt, batch.soft_offsets, remat)
    shift = new - batch.base_states  # [b, h]
    shift_leading = shift @ frozen.components  # [b, k]
    refusal_shift = shift_leading @ frozen.refusal_weight  # f_r(new) - f_r(base): the bias cancels
    harm_shift = shift_leading @ frozen.harmfulness_weight
    target = batch.harmless.astype(jnp.float32)
    refusal = _weighted_mean(optax.sigmoid_binary_cross_entropy(refusal_shift, target), batch.weights)
    harmfulness = _weighted_mean(optax.sigmoid_binary_cross_entropy(harm_shift, target), batch.weights)
    rest = shift.shape[1] - shift_leading.shape[1]
    remaining = jnp.maximum(jnp.sum(shift**2, axis=1) - jnp.sum(shift_leading**2, axis=1), 0.0) / rest
    norm = _weighted_mean(remaining, batch.weights)
    total = weights.refusal * refusal + weights.harmfulness * harmfulness + weights.norm * norm
    harmful_rows = batch.weights * (1 - target)
    harmless_rows = batch.weights * target
    metrics = {
        "loss": total,
        "refusal": refusal,
        "harmfulness": harmfulness,
        "norm": norm,
        # Mean move along the refusal direction (positive: towards compliance).
        "compliance_shift_harmful": _weighted_mean(refusal_shift, harmful_rows),
        "compliance_shift_harmless": _weighted_mean(refusal_shift, harmless_rows),
    }
    return total, metrics


class ResponseBatch(NamedTuple):
    """Chat input + a sampled response, left-padded; `response_mask` marks the response tokens to score."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_offsets: jax.Array  # [b]
    response_mask: jax.Array  # [b, t]
    wanted: jax.Array  # [b] 1: raise its likelihood, 0: push it down (unlikelihood)
    weights: jax.Array  # [b]


def prompt_tuning_loss(
    soft_prompt: jax.Array, batch: ResponseBatch, frozen: Frozen, config: ModelConfig, remat: bool = False
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Vanilla prompt tuning: mean token NLL of wanted responses, -log(1 - p) of unwanted ones."""
    params = frozen.params
    embeds = input_embeddings(params, batch.token_ids, soft_prompt, batch.soft_offsets)
    hidden = forward(params, config, inputs_embeds=embeds, attention_mask=batch.attention_mask, remat=remat).last_hidden_state
    log_probs = jax.nn.log_softmax(compute_logits(params, config, hidden[:, :-1]).astype(jnp.float32), axis=-1)
    token_log_p = jnp.take_along_axis(log_probs, batch.token_ids[:, 1:, None], axis=-1)[..., 0]  # [b, t-1]
    scored = batch.response_mask[:, 1:].astype(jnp.float32)
    likelihood = -token_log_p
    # -log(1 - p) = -log(-expm1(log p)); p is clipped below 1 so a certain token gives a large finite loss.
    unlikelihood = -jnp.log(-jnp.expm1(jnp.minimum(token_log_p, -1e-6)))
    wanted = batch.wanted.astype(jnp.float32)[:, None]
    per_token = wanted * likelihood + (1 - wanted) * unlikelihood
    per_sequence = jnp.sum(per_token * scored, axis=1) / jnp.maximum(jnp.sum(scored, axis=1), 1.0)
    total = _weighted_mean(per_sequence, batch.weights)
    metrics = {
        "loss": total,
        "likelihood": _weighted_mean(per_sequence, batch.weights * wanted[:, 0]),
        "unlikelihood": _weighted_mean(per_sequence, batch.weights * (1 - wanted[:, 0])),
    }
    return total, metrics
