"""The DRO objective as a pure function of the soft prompt, and what a training objective is.

For each training query, `base` is its representation under the human prompt
the soft prompt started from (fixed) and `new` its representation under the
soft prompt. With y = 0 for harmful and 1 for harmless queries and f_r, f_h the
refusal and harmfulness probes on the leading anchor coordinates:

    refusal     = BCE_with_logits(f_r(new) - f_r(base), y)
    harmfulness = BCE_with_logits(f_h(new) - f_h(base), y)
    norm        = mean over the hidden - k remaining coordinates of (new - base)^2
    preserve    = KL(p(first reply token | reference) || p(first reply token | new)), harmless rows only
    replies     = NLL per token, under the soft prompt, of the model's own greedy reply with no safety prompt,
                  teacher-forced, harmless rows only
    total       = w_r * refusal + w_h * harmfulness + w_n * norm + w_p * preserve + w_y * replies   (1, 1e-2, 1e-3, 0, 0)

The remaining coordinates are the orthonormal completion of the PCA axes, so
their squared length is |new - base|^2 - |(new - base) @ axes|^2: the loss
never multiplies by the full hidden x hidden basis.

The first three terms are the paper's loss (the two preservation terms are
ours and weigh 0 there). `preserve` keeps the first reply token's
distribution; `replies` keeps whole replies, at the price of one more pass
over query + reply per step (it is computed only when weighted: 0 in the
metrics otherwise). Its `reference` is the query's state with no safety prompt:
the training-time form of the evaluation's reply drift, which measures the
replies against the model's own replies with no prompt. `REFUSAL_SCORES` names what the refusal term reads; the
paper's is `probe`. The first reply token's distribution is the frozen LM
head applied to the final state, so the `head` score and the preservation
term cost one [b, hidden] x [hidden, vocab] product and no extra pass.

The terms are the fields of `LossWeights`: configurations, the command line,
reports, plots, ablations and the PyTorch twin all take their names from it,
so a new term is one field here and one entry in `dro_terms`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dro_jax.common.errors import DroJaxError
from dro_jax.dro.microbatch import map_microbatches
from dro_jax.inference.refusal_score import OpeningReadout, continuation_log_probs, first_token_log_odds, log_odds_of
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import ModelInputs, SharedPrefix, continuation_nll, final_states
from dro_jax.models.transformer import Params, compute_logits

# Short names the command line also accepts for a term.
TERM_ALIASES = {"harm": "harmfulness"}

REFUSAL_SCORES = {
    "probe": "the paper's: the shift of the anchor space's refusal-probe logit against the base state, "
             "BCE towards refusal for harmful and compliance for harmless queries",
    "head": "the refusal log-odds of the first reply token, read through the frozen LM head from the final state; "
            "the target is behaviour rather than a move along a direction fitted to the anchor data: harmful queries "
            "should refuse (BCE of the log-odds towards refusal) and harmless ones lean no more towards refusal than "
            "with no safety prompt (BCE of the log-odds' change against that, towards compliance)",
    "openings": "the refusal log-odds of the whole reply openings (the log-odds label's score, differentiated through "
                "one more pass over the openings' token tree), with the targets of `head`",
}


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """One weight per term of the DRO loss, in the order the terms are listed everywhere; an ablation sets one to zero."""

    refusal: float = 1.0
    harmfulness: float = 1e-2
    norm: float = 1e-3
    preserve: float = 0.0
    replies: float = 0.0

    def __post_init__(self) -> None:
        if any(weight < 0 for weight in self.as_tuple()):
            raise DroJaxError(f"loss weights must be non-negative, got {list(self.as_tuple())}")

    @classmethod
    def terms(cls) -> tuple[str, ...]:
        """The names of the loss terms, in order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_sequence(cls, weights: Sequence[float]) -> "LossWeights":
        """From one weight per term, in the order of `terms()`."""
        if len(weights) != len(cls.terms()):
            raise DroJaxError(f"give one loss weight per term ({', '.join(cls.terms())}), got {list(weights)}")
        return cls(*map(float, weights))

    def as_tuple(self) -> tuple[float, ...]:
        return tuple(getattr(self, term) for term in self.terms())

    def combine(self, values: Mapping[str, Any]) -> Any:
        """The weighted sum of the terms' `values` (jax or torch scalars alike)."""
        return sum(getattr(self, term) * values[term] for term in self.terms())

    def ablate(self, *terms: str) -> "LossWeights":
        """These terms (or their short names) weighted zero."""
        names = [TERM_ALIASES.get(term, term) for term in terms]
        unknown = set(names) - set(self.terms())
        if unknown:
            raise ValueError(f"unknown loss terms: {sorted(unknown)}")
        return dataclasses.replace(self, **{term: 0.0 for term in names})


class Frozen(NamedTuple):
    """Everything the loss reads but never trains: the model, the anchor space, the prefix every
    training input starts with (template head and the soft prompt's slot; run once per step), and
    the reply openings the behavioural refusal scores read."""

    params: Params
    prefix: SharedPrefix | None
    mean: jax.Array | None  # [h]
    components: jax.Array | None  # [h, k] PCA axes
    refusal_weight: jax.Array | None  # [k]
    harmfulness_weight: jax.Array | None  # [k]
    readout: OpeningReadout | None = None


class QueryBatch(NamedTuple):
    """Each training input's own part after the shared prefix (left-padded), with where the soft prompt sits
    in it (-1: in the prefix), its base and reference states and target; weight 0 marks a filler row."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_offsets: jax.Array  # [b]
    base_states: jax.Array  # [b, h] under the prompt the soft prompt started from
    reference_states: jax.Array  # [b, h] with no safety prompt
    reference_log_odds: jax.Array  # [b] refusal log-odds with no safety prompt
    harmless: jax.Array  # [b] 1 = harmless, 0 = harmful
    weights: jax.Array  # [b]
    reply_ids: jax.Array  # [b, r] the row's greedy reply with no safety prompt, right-padded (r = 0: none prepared)
    reply_mask: jax.Array  # [b, r] 1 on its tokens (harmless rows only)


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Mean over the rows with weight > 0 (filler rows weigh 0)."""
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def dro_terms(shift: jax.Array, frozen: Frozen, target: jax.Array, row_weights: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """({term name: value}, the shift along the refusal direction [b]) of the representation shifts [b, h]."""
    shift_leading = shift @ frozen.components  # [b, k]
    refusal_shift = shift_leading @ frozen.refusal_weight  # f_r(new) - f_r(base): the bias cancels
    harm_shift = shift_leading @ frozen.harmfulness_weight
    rest = shift.shape[1] - shift_leading.shape[1]
    remaining = jnp.maximum(jnp.sum(shift**2, axis=1) - jnp.sum(shift_leading**2, axis=1), 0.0) / rest
    terms = {
        "refusal": weighted_mean(optax.sigmoid_binary_cross_entropy(refusal_shift, target), row_weights),
        "harmfulness": weighted_mean(optax.sigmoid_binary_cross_entropy(harm_shift, target), row_weights),
        "norm": weighted_mean(remaining, row_weights),
    }
    return terms, refusal_shift


def first_token_kl(reference_logits: jax.Array, new_logits: jax.Array) -> jax.Array:
    """[b] KL(softmax(reference) || softmax(new)) over the vocabulary."""
    reference = jax.nn.log_softmax(reference_logits, axis=-1)
    return jnp.sum(jnp.exp(reference) * (reference - jax.nn.log_softmax(new_logits, axis=-1)), axis=-1)


def dro_loss(
    soft_prompt: jax.Array,
    batch: QueryBatch,
    frozen: Frozen,
    config: ModelConfig,
    weights: LossWeights = LossWeights(),
    remat: bool = False,
    refusal_score: str = "probe",
    microbatch: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics). Bind `config`, `weights`, `remat`, `refusal_score` (one of `REFUSAL_SCORES`) and
    `microbatch` (rows through the model at a time, see `dro_jax.dro.microbatch`) with functools.partial for
    jit/grad (or use `dro_objective`)."""

    with_replies = weights.replies > 0
    if with_replies and batch.reply_ids.shape[1] == 0:
        raise DroJaxError("the replies term needs the training set's no-prompt replies (prepare_training_set(..., reply_tokens=N))")

    def through_model(rows):
        token_ids, attention_mask, offsets, reply_ids, reply_mask = rows
        inputs = ModelInputs(token_ids, attention_mask, soft_prompt, offsets, frozen.prefix)
        reply_nll = states = log_probs = None
        if with_replies:  # the states at the last query token come with the replies' pass
            reply_nll, states = continuation_nll(frozen.params, config, inputs, reply_ids, reply_mask, remat)
        if refusal_score == "openings":
            log_probs, states = continuation_log_probs(frozen.params, config, inputs, frozen.readout.tree, remat)
        elif states is None:
            states = final_states(frozen.params, config, inputs, remat)
        return log_probs, states, reply_nll

    rows = (batch.token_ids, batch.attention_mask, batch.soft_offsets, batch.reply_ids, batch.reply_mask)
    log_probs, new, reply_nll = map_microbatches(through_model, rows, microbatch)
    target = batch.harmless.astype(jnp.float32)
    terms, refusal_shift = dro_terms(new - batch.base_states, frozen, target, batch.weights)
    new_logits = compute_logits(frozen.params, config, new[:, None])[:, 0]
    reference_logits = compute_logits(frozen.params, config, batch.reference_states[:, None])[:, 0]
    terms["preserve"] = weighted_mean(first_token_kl(reference_logits, new_logits), batch.weights * target)
    terms["replies"] = jnp.float32(0.0)
    if with_replies:
        per_token = reply_nll / jnp.maximum(jnp.sum(batch.reply_mask, axis=1), 1)
        terms["replies"] = weighted_mean(per_token, batch.weights * target * (jnp.sum(batch.reply_mask, axis=1) > 0))
    behaviour = {}
    if refusal_score != "probe":
        if refusal_score == "openings":
            log_odds, reference = log_odds_of(log_probs, frozen.readout.is_refusal), batch.reference_log_odds
        else:
            log_odds, reference = first_token_log_odds(new_logits, frozen.readout), first_token_log_odds(reference_logits, frozen.readout)
        # Harmful: refuse; harmless: no closer to refusal than with no safety prompt.
        compliance = -(log_odds - target * reference)
        terms["refusal"] = weighted_mean(optax.sigmoid_binary_cross_entropy(compliance, target), batch.weights)
        behaviour = {
            "refusal_log_odds_harmful": weighted_mean(log_odds, batch.weights * (1 - target)),
            "refusal_log_odds_harmless": weighted_mean(log_odds, batch.weights * target),
        }
    total = weights.combine(terms)
    return total, {
        "loss": total,
        **terms,
        # Mean move along the refusal direction (positive: towards compliance).
        "compliance_shift_harmful": weighted_mean(refusal_shift, batch.weights * (1 - target)),
        "compliance_shift_harmless": weighted_mean(refusal_shift, batch.weights * target),
        **behaviour,
    }


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training run minimises: `loss(soft_prompt, batch, frozen) -> (total, metrics)`, pure; its
    `name` (progress bars, messages); the metric names worth showing while it trains; and `step_flops(batch,
    frozen)`, the model FLOPs of one step on a batch of host values (the throughput figures of `metrics.jsonl`)."""

    name: str
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    shown: tuple[str, ...]
    step_flops: Callable[[Any, Frozen], float]


def training_flops(config: ModelConfig, passes: Sequence[tuple[np.ndarray, int]], frozen: Frozen, head_positions: int = 0) -> float:
    """Model FLOPs of one training step that runs a forward pass per (each real row's own tokens, positions the
    output head reads) of `passes` after the shared prefix (run once), and the head on `head_positions` more;
    forward and backward to the soft prompt (`ModelConfig.pass_flops`). Recomputation (`remat`) is not counted,
    as model FLOP utilisation does not count it."""
    prefix = 0 if frozen.prefix is None else len(frozen.prefix.tokens)
    passes_flops = sum(
        config.pass_flops(prefix + own, prefix, logit_positions=logits, backward=backward) for own, logits in passes for backward in (False, True)
    )
    return passes_flops + 2 * 2.0 * config.embedding_parameters * head_positions  # the head's forward and backward


def dro_step_flops(config: ModelConfig, weights: LossWeights, refusal_score: str, batch: QueryBatch, frozen: Frozen) -> float:
    """`training_flops` of `dro_loss`'s passes: the replies' (the head on each reply token), the openings'
    (the tree's nodes as more tokens of each row, the head on each node and the last prompt token) or the
    plain pass to the final states; the head on the two states the preservation term compares."""
    real = np.asarray(batch.weights) > 0
    own = np.asarray(batch.attention_mask)[real].sum(axis=1)
    rows = int(real.sum())
    passes = []
    if weights.replies > 0:
        reply = np.asarray(batch.reply_mask)[real].sum(axis=1)
        passes.append((own + reply, int(reply.sum())))
    if refusal_score == "openings":
        nodes = frozen.readout.tree.token_ids.shape[0]
        passes.append((own + nodes, rows * (nodes + 1)))
    elif not passes:
        passes.append((own, 0))
    return training_flops(config, passes, frozen, head_positions=2 * rows)


def check_refusal_score(name: str) -> str:
    if name not in REFUSAL_SCORES:
        raise DroJaxError(f"refusal score must be one of {', '.join(REFUSAL_SCORES)}, got {name!r}")
    return name


def dro_objective(
    config: ModelConfig, weights: LossWeights = LossWeights(), remat: bool = False, refusal_score: str = "probe", microbatch: int | None = None
) -> Objective:
    """The DRO loss with its model config, term weights, refusal score and microbatch size bound."""
    loss = functools.partial(
        dro_loss, config=config, weights=weights, remat=remat, refusal_score=check_refusal_score(refusal_score), microbatch=microbatch
    )
    flops = functools.partial(dro_step_flops, config, weights, refusal_score)
    return Objective("DRO training", loss, ("loss", *LossWeights.terms()), flops)
