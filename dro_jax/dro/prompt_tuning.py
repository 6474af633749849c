"""The vanilla prompt-tuning baseline: sampled responses judged wanted or unwanted, and its loss.

Wanted responses are refusals of harmful queries and compliant answers to
harmless ones; the loss raises the likelihood of wanted and lowers that of
unwanted ones (unlikelihood). `PromptTuningConfig` names every choice the
reference makes differently from the quick default: how many responses per
query, whether no-prompt responses are added as negatives, token-level or
per-sequence means, the unlikelihood weight, the response cut and the epochs.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import PurePath
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.anchors.collect import LABEL_SAMPLING
from dro_jax.common.errors import DroJaxError
from dro_jax.data.queries import QueryPairs
from dro_jax.dro.loss import Frozen, Objective, training_flops, weighted_mean
from dro_jax.dro.microbatch import map_microbatches
from dro_jax.inference.batched import Batching
from dro_jax.inference.encoding import encode_queries
from dro_jax.inference.settings import NO_PROMPT, PromptSetting, resolve_system_prompt
from dro_jax.judging.judges import RefusalJudge
from dro_jax.judging.responses import Response, generate_responses, keep_longest
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import SharedPrefix, input_embeddings, prefix_cache, row_positions
from dro_jax.models.transformer import compute_logits, forward

# The reference weighs unlikelihood 5x for Llama-2-chat and CodeLlama-Instruct, the two models that already
# refuse nearly every harmful query without a prompt (so unwanted rows are few), and 1x for every other one.
# It matches the 7B checkpoints' directory names; here any size matches.
_HEAVY_UNLIKELIHOOD = (("llama-2-", "-chat"), ("codellama-", "-instruct"))
HEAVY_UNLIKELIHOOD_WEIGHT = 5.0


def reference_unlikelihood_weight(model: str) -> float:
    """The reference's unlikelihood weight for `model` (a path or name): 5 for Llama-2 chat and CodeLlama
    instruct checkpoints, 1 otherwise."""
    name = PurePath(model).name.lower()
    return HEAVY_UNLIKELIHOOD_WEIGHT if any(name.startswith(a) and b in name for a, b in _HEAVY_UNLIKELIHOOD) else 1.0


@dataclasses.dataclass(frozen=True)
class PromptTuningConfig:
    """How the baseline's training set is sampled and how its loss averages.

    The defaults are the quick baseline for CPUs: 2 responses per query under
    the init prompt, no negatives, each response's mean token loss averaged
    over the rows, unlikelihood weight 1. `reference()` is the paper's.

    - `responses`: responses per query kept for training; `samples` are
      sampled (default: `responses`) and the `responses` longest kept, as the
      reference keeps the 20 longest of 25.
    - `negatives`: also sample under no prompt and add the unwanted ones
      (compliant answers to harmful queries, refusals of harmless ones) with
      `wanted=0`, as the reference does: only the no-prompt behaviour to move
      away from is added, the wanted no-prompt responses are not. Every row,
      negatives included, is trained with the soft prompt in the system slot.
    - `token_mean`: the reference's means: the likelihood term is the mean over
      every scored token of the batch's wanted rows, the unlikelihood term the
      same over the unwanted rows, total = likelihood + weight * unlikelihood.
      Otherwise each row's tokens are averaged first and the total is the
      mean over rows, the unwanted rows' means times the weight.
    - `max_response_tokens`: responses are cut to this many tokens for training;
      `max_new_tokens` is how long they are generated (and judged) before the
      cut (default: the cut).
    - `judge`: any `RefusalJudge` (default: the packaged string judge); it
      judges the responses to harmful and harmless queries alike.
    """

    responses: int = 2
    samples: int | None = None
    negatives: bool = False
    token_mean: bool = False
    unlikelihood_weight: float = 1.0
    max_response_tokens: int = 100
    max_new_tokens: int | None = None
    epochs: int = 5
    judge: RefusalJudge | None = None

    @classmethod
    def reference(cls, model: str = "", **overrides: Any) -> "PromptTuningConfig":
        """The reference's baseline: the 20 longest of 25 responses per query (generated up to 300 tokens, the
        reference's longest), no-prompt negatives, token-level means, the unlikelihood weight of `model` (see
        `reference_unlikelihood_weight`), responses cut to 100 tokens, 5 epochs."""
        preset = dict(
            responses=20, samples=25, negatives=True, token_mean=True, unlikelihood_weight=reference_unlikelihood_weight(model),
            max_response_tokens=100, max_new_tokens=300, epochs=5,
        )
        return cls(**{**preset, **overrides})

    def __post_init__(self) -> None:
        for name in ("responses", "max_response_tokens", "epochs"):
            if getattr(self, name) < 1:
                raise DroJaxError(f"prompt tuning: {name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.samples is not None and self.samples < self.responses:
            raise DroJaxError(f"prompt tuning: cannot keep {self.responses} responses per query out of {self.samples} sampled")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise DroJaxError(f"prompt tuning: max new tokens must be at least 1, got {self.max_new_tokens}")
        if not self.unlikelihood_weight >= 0:
            raise DroJaxError(f"the unlikelihood weight must be non-negative, got {self.unlikelihood_weight}")

    @property
    def generated_tokens(self) -> int:
        """How many tokens each response is sampled to: the judge reads the whole reply, training its first part."""
        return self.max_response_tokens if self.max_new_tokens is None else self.max_new_tokens

    def describe(self) -> str:
        """One line for logs and reports."""
        kept = f"the {self.responses} longest of {self.samples}" if self.samples else str(self.responses)
        means = "token-level" if self.token_mean else "per-sequence"
        return (f"{kept} responses per query{' + no-prompt negatives' if self.negatives else ''}, {means} means, "
                f"unlikelihood x{self.unlikelihood_weight:g}, cut to {self.max_response_tokens} tokens, {self.epochs} epochs")


class ResponseBatch(NamedTuple):
    """Chat input + a sampled response, left-padded; `response_mask` marks the response tokens to score."""

    token_ids: jax.Array  # [b, t]
    attention_mask: jax.Array  # [b, t]
    soft_offsets: jax.Array  # [b]
    response_mask: jax.Array  # [b, t]
    wanted: jax.Array  # [b] 1: raise its likelihood, 0: push it down (unlikelihood)
    weights: jax.Array  # [b]


def prompt_tuning_loss(
    soft_prompt: jax.Array, batch: ResponseBatch, frozen: Frozen, config: ModelConfig, remat: bool = False,
    microbatch: int | None = None, token_mean: bool = False, unlikelihood_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token NLL of wanted responses, -log(1 - p) of unwanted ones, averaged as `PromptTuningConfig.token_mean`
    says; the unlikelihood part weighs `unlikelihood_weight`."""
    params = frozen.params

    def row_sums(rows):
        """Per row: the summed token losses of its response and how many tokens were scored; everything
        the combination needs, so that microbatches give the whole batch's loss."""
        token_ids, attention_mask, soft_offsets, response_mask, wanted = rows
        shared = prefix_cache(params, config, frozen.prefix, soft_prompt, remat)
        embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
        positions = row_positions(attention_mask, frozen.prefix)
        hidden = forward(
            params, config, inputs_embeds=embeds, attention_mask=attention_mask, positions=positions, prefix=shared, remat=remat
        ).last_hidden_state
        log_probs = jax.nn.log_softmax(compute_logits(params, config, hidden[:, :-1]).astype(jnp.float32), axis=-1)
        token_log_p = jnp.take_along_axis(log_probs, token_ids[:, 1:, None], axis=-1)[..., 0]  # [b, t-1]
        scored = response_mask[:, 1:].astype(jnp.float32)
        likelihood = -token_log_p
        # -log(1 - p) = -log(-expm1(log p)); p is clipped below 1 so a certain token gives a large finite loss.
        unlikelihood = -jnp.log(-jnp.expm1(jnp.minimum(token_log_p, -1e-6)))
        wanted = wanted.astype(jnp.float32)[:, None]
        per_token = wanted * likelihood + (1 - wanted) * unlikelihood
        return jnp.sum(per_token * scored, axis=1), jnp.sum(scored, axis=1)

    rows = (batch.token_ids, batch.attention_mask, batch.soft_offsets, batch.response_mask, batch.wanted)
    sums, counts = map_microbatches(row_sums, rows, microbatch)
    wanted = batch.wanted.astype(jnp.float32)
    in_wanted, in_unwanted = batch.weights * wanted, batch.weights * (1 - wanted)
    if token_mean:
        likelihood, unlikelihood = _token_mean(sums, counts, in_wanted), _token_mean(sums, counts, in_unwanted)
        total = likelihood + unlikelihood_weight * unlikelihood
    else:
        per_sequence = sums / jnp.maximum(counts, 1.0)
        likelihood, unlikelihood = weighted_mean(per_sequence, in_wanted), weighted_mean(per_sequence, in_unwanted)
        total = weighted_mean(per_sequence * (wanted + unlikelihood_weight * (1 - wanted)), batch.weights)
    return total, {"loss": total, "likelihood": likelihood, "unlikelihood": unlikelihood}


def _token_mean(sums: jax.Array, counts: jax.Array, row_weights: jax.Array) -> jax.Array:
    """The mean loss over every scored token of the rows with weight > 0 (0 when there are none)."""
    return jnp.sum(sums * row_weights) / jnp.maximum(jnp.sum(counts * row_weights), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class ResponseSet:
    """Query + response sequences after the prefix they share, left-padded to one length, with the soft
    prompt's slot (in the prefix or in the rows)."""

    prefix: SharedPrefix | None
    token_ids: np.ndarray  # [n, t]
    attention_mask: np.ndarray
    soft_offsets: np.ndarray
    response_mask: np.ndarray  # [n, t] 1 on response tokens
    wanted: np.ndarray  # [n]

    def __len__(self) -> int:
        return len(self.wanted)

    def rows(self, index: np.ndarray, weights: np.ndarray) -> ResponseBatch:
        return ResponseBatch(
            self.token_ids[index], self.attention_mask[index], self.soft_offsets[index],
            self.response_mask[index], self.wanted[index], weights,
        )


def prepare_response_set(
    model: LoadedModel,
    pairs: QueryPairs,
    init_prompt: str,
    num_rows: int,
    settings: PromptTuningConfig = PromptTuningConfig(),
    seed: int = 42,
    batching: Batching = Batching(),
) -> ResponseSet:
    """Samples responses per query under `init_prompt` (and, with `settings.negatives`, under no prompt), judges
    them, and lays them out behind a `num_rows` slot: every row is trained with the soft prompt in its place."""
    if settings.negatives and resolve_system_prompt(init_prompt) is None:
        raise DroJaxError("prompt tuning: no-prompt negatives need a human init prompt; with no prompt they would "
                          "repeat the unwanted responses the training set already has")
    queries = pairs.queries
    sampling = dataclasses.replace(
        LABEL_SAMPLING, max_new_tokens=settings.generated_tokens,
        min_new_tokens=min(LABEL_SAMPLING.min_new_tokens, settings.generated_tokens),
    )

    def sample(setting: str) -> list[Response]:
        encoded = encode_queries(model, queries, PromptSetting.from_text(setting))
        responses = generate_responses(
            model, encoded, sampling, settings.samples or settings.responses, seed, settings.judge, batching
        )
        return keep_longest(responses, settings.responses if settings.samples else None)

    def is_wanted(response: Response) -> bool:
        return response.refusal == (response.query_index < len(pairs.harmful))

    examples = [(r, is_wanted(r)) for r in sample(init_prompt)]
    if settings.negatives:
        examples += [(r, False) for r in sample(NO_PROMPT) if not is_wanted(r)]
    slot = encode_queries(model, queries, PromptSetting.soft("slot", np.zeros((num_rows, model.config.hidden_size), np.float32)))
    replies = [model.tokenizer.encode(r.text, add_special_tokens=False)[: settings.max_response_tokens] for r, _ in examples]
    inputs = dataclasses.replace(
        slot.select([r.query_index for r, _ in examples]),
        sequences=[slot.sequences[r.query_index] + reply for (r, _), reply in zip(examples, replies)],
    )
    token_ids, mask, offsets = inputs.padded_rows(model.pad_id)
    response_mask = np.zeros_like(mask)
    for row, reply in enumerate(replies):
        response_mask[row, mask.shape[1] - len(reply) :] = 1
    wanted = np.asarray([w for _, w in examples], np.int32)
    # One setting trains, as in DRO: the prefix unpadded.
    return ResponseSet(inputs.prefix(bucket=None), token_ids, mask, offsets, response_mask, wanted)


def prompt_tuning_objective(
    config: ModelConfig, settings: PromptTuningConfig = PromptTuningConfig(), remat: bool = False, microbatch: int | None = None
) -> Objective:
    """The baseline's loss with its model config, means, unlikelihood weight and microbatch size bound."""
    loss = functools.partial(
        prompt_tuning_loss, config=config, remat=remat, microbatch=microbatch, token_mean=settings.token_mean,
        unlikelihood_weight=settings.unlikelihood_weight,
    )
    return Objective("prompt tuning", loss, ("loss", "likelihood", "unlikelihood"), functools.partial(prompt_tuning_step_flops, config))


def prompt_tuning_step_flops(config: ModelConfig, batch: ResponseBatch, frozen: Frozen) -> float:
    """`training_flops` of the baseline's one pass over each row's own tokens (query and response after the
    shared prefix), the head on every one of them but the last."""
    own = np.asarray(batch.attention_mask)[np.asarray(batch.weights) > 0].sum(axis=1)
    return training_flops(config, [(own, int((own - 1).sum()))], frozen)
