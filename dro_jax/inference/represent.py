"""Representations: the final-norm hidden state at each query's last input position."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from dro_jax.inference.batched import Batching, PassInfo, run_batched
from dro_jax.inference.chat import PromptSetting
from dro_jax.inference.encoding import EncodedQueries, ModelInputs, encode_queries
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import final_states
from dro_jax.parallel.sharding import on_mesh

last_position_states = jax.jit(final_states, static_argnames=("config", "remat"))


def represent_tokens(
    model: LoadedModel,
    prompts: EncodedQueries | Sequence[Sequence[int]],
    batch_size: int = 32,
    progress: bool = True,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """[n, hidden] float32 representations of already-encoded sequences, in input order; batches split over `mesh`."""

    def step(params, inputs: ModelInputs, batch) -> jax.Array:
        with on_mesh(mesh):
            return last_position_states(
                params, model.config, inputs.token_ids, inputs.attention_mask, inputs.soft_prompt, inputs.soft_offsets, prefix=inputs.prefix
            )

    return run_batched(model, EncodedQueries.of(prompts), step, PassInfo("representations"), Batching(batch_size, mesh, progress))


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
