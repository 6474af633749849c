"""Representations: the final-norm hidden state at each query's last input position."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.chat import PromptSetting
from dro_jax.inference.encoding import EncodedQueries, encode_queries
from dro_jax.loading import LoadedModel
from dro_jax.models.inputs import final_states
from dro_jax.models.partitioning import place_params
from dro_jax.parallel.distributed import shows_progress
from dro_jax.parallel.sharding import on_mesh, rows_per_batch, to_host

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
    params = place_params(model.params, model.config, mesh)
    states = np.zeros((len(prompts), model.config.hidden_size), np.float32)
    with tqdm(total=len(prompts), desc="representations", unit="query", disable=not shows_progress(progress)) as bar:
        for batch in prompts.batches(batch_size, model.pad_id, model.config.max_position_embeddings):
            inputs = prompts.model_inputs(batch, mesh)
            with on_mesh(mesh):
                out = last_position_states(
                    params, model.config, inputs.token_ids, inputs.attention_mask, inputs.soft_prompt, inputs.soft_offsets, prefix=inputs.prefix
                )
            real = batch.index >= 0
            states[batch.index[real]] = to_host(out)[real]
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
