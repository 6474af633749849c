"""Representations: the final-norm hidden state at each query's last input position."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from dro_jax.inference.batched import Batching, PassInfo, run_batched
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.inference.settings import PromptSetting
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import ModelInputs, final_states
from dro_jax.parallel.sharding import on_mesh

last_position_states = jax.jit(final_states, static_argnames=("config", "remat"))


def represent_tokens(
    model: LoadedModel,
    prompts: EncodedQueries | Sequence[Sequence[int]],
    batching: Batching = Batching(),
) -> np.ndarray:
    """[n, hidden] float32 representations of already-encoded sequences, in input order; batches as `batching` says."""

    def step(params, inputs: ModelInputs, batch) -> jax.Array:
        with on_mesh(batching.mesh):
            return last_position_states(params, model.config, inputs)

    return run_batched(model, EncodedQueries.of(prompts), step, PassInfo("representations"), batching)


def represent_queries(
    model: LoadedModel,
    queries: Sequence[str],
    setting: PromptSetting | str | None = None,
    source: str = "queries",
    batching: Batching = Batching(),
) -> np.ndarray:
    """Chat-formats `queries` under a prompt setting and returns their [n, hidden] representations."""
    return represent_tokens(model, encode_queries(model, queries, setting, source), batching)
