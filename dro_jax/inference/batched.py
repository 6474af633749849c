"""One loop for every batched pass over encoded queries (representations, opening scores, reply likelihood,
generation): the context check, the shared prefix run once for all batches, padded batches in few shapes, their
split over a mesh, the progress bar, and the results put back in input order. A pass is a step on one batch."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.encoding import EncodedQueries
from dro_jax.inference.padding import PaddedBatch
from dro_jax.loading import LoadedModel
from dro_jax.models.config import ModelConfig
from dro_jax.models.inputs import ModelInputs, prefix_cache
from dro_jax.models.partitioning import place_params
from dro_jax.models.transformer import KVCache, Params
from dro_jax.parallel.distributed import shows_progress
from dro_jax.parallel.sharding import on_mesh, replicate, rows_per_batch, tree_to_host

# (placed params, the batch's inputs on the mesh, the batch itself) -> a pytree of [batch, ...] arrays. A step
# enters the mesh context (`on_mesh`) around its jitted call only: a value made inside it (a PRNG key, a mask)
# would be an array of the whole mesh, which several processes cannot split again.
Step = Callable[[Params, ModelInputs, PaddedBatch], Any]


@dataclasses.dataclass(frozen=True)
class Batching:
    """How a pass runs: at most `batch_size` rows per batch, split over `mesh`, with a progress bar or not. Every
    pass, and every stage made of passes (anchors, labels, evaluation), takes it whole rather than the three apart.
    It holds no model: one batching serves the policy and its judge model, and the sweep's models one after another
    (each placed on the mesh by `run_batched`)."""

    batch_size: int = 32
    mesh: Mesh | None = None
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """What a pass is called on its progress bar (`desc`, per `unit`), and the tokens it puts after each
    sequence (`added_tokens`, named `added` in errors: new tokens, an opening), which must fit the context too."""

    desc: str
    unit: str = "query"
    added_tokens: int = 0
    added: str = ""


def check_context(model: LoadedModel, encoded: EncodedQueries, info: PassInfo) -> None:
    """A clear error for the first sequence that, with what the pass adds, does not fit the model's context."""
    limit = model.config.max_position_embeddings
    for number, ids in enumerate(encoded.sequences, start=1):
        if len(ids) + info.added_tokens > limit:
            beyond = f"; with {info.added} ({info.added_tokens} tokens) it exceeds" if info.added_tokens else ", longer than"
            raise DroJaxError(f"{encoded.source}: query {number} is {len(ids)} tokens{beyond} the model's context of {limit}")


_prefix_cache = jax.jit(prefix_cache, static_argnames=("config", "remat"))


def run_prefix(params: Params, config: ModelConfig, encoded: EncodedQueries, mesh: Mesh | None = None) -> KVCache | None:
    """The shared prefix of `encoded` run once, for every batch of a pass to attend to (None: they share none).
    A soft prompt goes in only when it sits in the prefix, so that the settings without one there share a program."""
    prefix = encoded.placed_prefix(mesh)
    if prefix is None:
        return None
    soft_prompt = jax.device_put(encoded.soft_prompt) if encoded.soft_in_prefix else None
    with on_mesh(mesh):
        return _prefix_cache(params, config, prefix, replicate(soft_prompt, mesh))


def run_batched(
    model: LoadedModel, encoded: EncodedQueries, step: Step, info: PassInfo, batching: Batching = Batching(), serving: bool = False
) -> Any:
    """`step` over every batch of `encoded`; its outputs gathered on the host as [n, ...] arrays in input order.
    `serving`: the weights in generation's layout (see `dro_jax.models.partitioning.param_shardings`)."""
    if not len(encoded):
        raise DroJaxError(f"{encoded.source}: nothing to run ({info.desc}): no sequences given")
    check_context(model, encoded, info)
    mesh = batching.mesh
    params = place_params(model.params, model.config, mesh, serving)
    prefilled = run_prefix(params, model.config, encoded, mesh)
    longest = model.config.max_position_embeddings - info.added_tokens
    gathered = None

    def collect(batch: PaddedBatch, on_device: Any) -> None:
        nonlocal gathered
        out = tree_to_host(on_device)
        if gathered is None:
            gathered = jax.tree.map(lambda leaf: np.zeros((len(encoded), *leaf.shape[1:]), leaf.dtype), out)
        real = batch.index >= 0
        for whole, part in zip(jax.tree.leaves(gathered), jax.tree.leaves(out)):
            whole[batch.index[real]] = part[real]
        bar.update(batch.num_real)

    # One batch in flight while the one before it is copied to the host: jax dispatches asynchronously, so the
    # accelerator starts on the next batch instead of waiting for the host to fetch, pad and send it.
    pending = None
    with tqdm(total=len(encoded), desc=info.desc, unit=info.unit, disable=not shows_progress(batching.progress)) as bar:
        for batch in encoded.batches(rows_per_batch(batching.batch_size, len(encoded), mesh), model.pad_id, longest):
            running = (batch, step(params, encoded.model_inputs(batch, mesh, prefilled), batch))
            if pending is not None:
                collect(*pending)
            pending = running
        if pending is not None:
            collect(*pending)
    return gathered
