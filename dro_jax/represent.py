"""Representations: the final-norm hidden state at each query's last input position."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dro_jax.batching import left_padded_batches
from dro_jax.chat import ChatFormatter
from dro_jax.errors import DroJaxError
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, forward


@functools.partial(jax.jit, static_argnames=("config",))
def last_position_states(params: Params, config: ModelConfig, token_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[batch, hidden] float32 states after the final norm at the last (left-padded) position."""
    out = forward(params, config, token_ids, attention_mask)
    return out.last_hidden_state[:, -1].astype(jnp.float32)


def encode_queries(model: LoadedModel, queries: Sequence[str], system_prompt: str | None, source: str = "queries") -> list[list[int]]:
    """Chat-formats every query; a query that does not fit the model's context is an error."""
    formatter = ChatFormatter(model.tokenizer, system_prompt)
    encoded = [formatter.encode(q) for q in queries]
    limit = model.config.max_position_embeddings
    for number, ids in enumerate(encoded, start=1):
        if len(ids) > limit:
            raise DroJaxError(
                f"{source}: query {number} is {len(ids)} tokens with its chat template, "
                f"longer than the model's context of {limit}"
            )
    return encoded


def represent_tokens(model: LoadedModel, sequences: Sequence[Sequence[int]], batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """[n, hidden] float32 representations of already-encoded sequences, in input order."""
    if not sequences:
        raise DroJaxError("nothing to represent: no sequences given")
    batch_size = min(batch_size, len(sequences))
    states = np.zeros((len(sequences), model.config.hidden_size), np.float32)
    batches = list(left_padded_batches(sequences, batch_size, model.pad_id, model.config.max_position_embeddings))
    with tqdm(total=len(sequences), desc="representations", unit="query", disable=not progress) as bar:
        for batch in batches:
            out = np.asarray(last_position_states(model.params, model.config, batch.token_ids, batch.attention_mask))
            real = batch.index >= 0
            states[batch.index[real]] = out[real]
            bar.update(batch.num_real)
    return states


def represent_queries(
    model: LoadedModel, queries: Sequence[str], system_prompt: str | None = None, batch_size: int = 32, progress: bool = True, source: str = "queries"
) -> np.ndarray:
    """Chat-formats `queries` under `system_prompt` and returns their [n, hidden] representations."""
    return represent_tokens(model, encode_queries(model, queries, system_prompt, source), batch_size, progress)
