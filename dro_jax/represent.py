"""Representations: the final-norm hidden state at each query's last input position."""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dro_jax.batching import PaddedBatch, left_padded_batches
from dro_jax.chat import SLOT_PLACEHOLDER, ChatFormatter, PromptSetting, as_prompt_setting
from dro_jax.errors import DroJaxError
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, forward
from dro_jax.sharding import replicate, rows_per_batch, shard_batch
from dro_jax.soft_prompt import input_embeddings


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedQueries:
    """Chat-formatted token sequences; with a soft prompt, its rows start at `soft_starts[i]` in sequence i."""

    sequences: list[list[int]]
    soft_prompt: np.ndarray | None = None
    soft_starts: list[int] | None = None

    @classmethod
    def of(cls, prompts: "EncodedQueries | Sequence[Sequence[int]]") -> "EncodedQueries":
        return prompts if isinstance(prompts, EncodedQueries) else cls([list(p) for p in prompts])

    def __len__(self) -> int:
        return len(self.sequences)

    def select(self, rows: Sequence[int]) -> "EncodedQueries":
        """The sequences at `rows` (repeats allowed), same soft prompt."""
        starts = None if self.soft_starts is None else [self.soft_starts[r] for r in rows]
        return EncodedQueries([self.sequences[r] for r in rows], self.soft_prompt, starts)

    def batches(self, batch_size: int, pad_id: int, max_length: int | None = None) -> Iterator[PaddedBatch]:
        return left_padded_batches(self.sequences, batch_size, pad_id, max_length, self.soft_starts)

    def soft_inputs(self, batch: PaddedBatch) -> tuple[jax.Array | None, jax.Array | None]:
        """(soft_prompt, offsets) arguments for the model functions; (None, None) without one."""
        if self.soft_prompt is None:
            return None, None
        return jnp.asarray(self.soft_prompt), jnp.asarray(batch.soft_offsets)

    def model_inputs(self, batch: PaddedBatch, mesh: Mesh | None = None) -> tuple:
        """(token_ids, attention_mask, soft_prompt, soft_offsets) for the model functions.

        With a mesh, the rows are split over its devices and the soft prompt is on every device.
        """
        soft_prompt, offsets = self.soft_inputs(batch)
        token_ids, mask, offsets = shard_batch((batch.token_ids, batch.attention_mask, offsets), mesh)
        return token_ids, mask, replicate(soft_prompt, mesh), offsets


def encode_queries(
    model: LoadedModel, queries: Sequence[str], setting: PromptSetting | str | None, source: str = "queries"
) -> EncodedQueries:
    """Chat-formats every query under a prompt setting; a query that does not fit the context is an error."""
    setting = as_prompt_setting(setting)
    if setting.soft_prompt is None:
        formatter = ChatFormatter(model.tokenizer, setting.text)
        encoded = EncodedQueries([formatter.encode(q) for q in queries])
    else:
        if setting.soft_prompt.shape[1] != model.config.hidden_size:
            raise DroJaxError(
                f"{setting.name}: the soft prompt is {setting.soft_prompt.shape[1]} wide but the model's hidden size "
                f"is {model.config.hidden_size}"
            )
        formatter = ChatFormatter(model.tokenizer, SLOT_PLACEHOLDER)
        pairs = [formatter.encode_setting(q, len(setting.soft_prompt), model.pad_id) for q in queries]
        encoded = EncodedQueries([ids for ids, _ in pairs], setting.soft_prompt, [start for _, start in pairs])
    limit = model.config.max_position_embeddings
    for number, ids in enumerate(encoded.sequences, start=1):
        if len(ids) > limit:
            raise DroJaxError(
                f"{source}: query {number} is {len(ids)} tokens with its chat template, "
                f"longer than the model's context of {limit}"
            )
    return encoded


def final_states(
    params: Params,
    config: ModelConfig,
    token_ids: jax.Array,
    attention_mask: jax.Array,
    soft_prompt: jax.Array | None = None,
    soft_offsets: jax.Array | None = None,
    remat: bool = False,
) -> jax.Array:
    """[batch, hidden] float32 states after the final norm at the last (left-padded) position.

    Pure, so the DRO loss differentiates it with respect to `soft_prompt`.
    """
    embeds = input_embeddings(params, token_ids, soft_prompt, soft_offsets)
    out = forward(params, config, inputs_embeds=embeds, attention_mask=attention_mask, remat=remat)
    return out.last_hidden_state[:, -1].astype(jnp.float32)


last_position_states = jax.jit(final_states, static_argnames=("config", "remat"))


def represent_tokens(
    model: LoadedModel,
    prompts: EncodedQueries | Sequence[Sequence[int]],
    batch_size: int = 32,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """[n, hidden] float32 representations of already-encoded sequences, in input order; batches split over `mesh`."""
    prompts = EncodedQueries.of(prompts)
    if not len(prompts):
        raise DroJaxError("nothing to represent: no sequences given")
    batch_size = rows_per_batch(batch_size, len(prompts), mesh)
    params = replicate(model.params, mesh)
    states = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    with tqdm(total=len(prompts), desc="representations", unit="query", disable=not progress) as bar:
        for batch in prompts.batches(batch_size, model.pad_id, model.config.max_position_embeddings):
            out = last_position_states(params, model.config, *prompts.model_inputs(batch, mesh))
            real = batch.index >= 0
            states[batch.index[real]] = np.asarray(out)[real]
            bar.update(batch.num_real)
    return states


def represent_queries(
    model: LoadedModel,
    queries: Sequence[str],
    setting: PromptSetting | str | None = None,
    batch_size: int = 32,
    progress: bool = True,
    source: str = "queries",
) -> np.ndarray:
    """Chat-formats `queries` under a prompt setting and returns their [n, hidden] representations."""
    return represent_tokens(model, encode_queries(model, queries, setting, source), batch_size, progress)
