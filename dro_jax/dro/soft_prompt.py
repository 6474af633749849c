"""The initial values of soft prompts: trainable input-embedding rows that fill the system-message slot
(`dro_jax.models.inputs` splices them into the model's input; `dro_jax.inference.settings` reads and writes
their files)."""

from __future__ import annotations

import jax
import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.inference.chat import ChatFormatter
from dro_jax.inference.settings import resolve_system_prompt
from dro_jax.models.inputs import embed_tokens
from dro_jax.models.transformer import Params
from dro_jax.parallel.sharding import to_host


def prompt_token_ids(tokenizer, text: str) -> list[int]:
    """The tokens a safety prompt occupies inside the chat template (context-aware, not a bare encode)."""
    ids, start, stop = ChatFormatter(tokenizer, text).encode_with_slot("Hi")
    return ids[start:stop]


def initial_soft_prompt(params: Params, tokenizer, init: str) -> np.ndarray:
    """Rows initialised from the input embeddings of a safety prompt's tokens (a name or text)."""
    text = resolve_system_prompt(init)
    if text is None:
        raise DroJaxError("a soft prompt needs an initial prompt text; 'none' has no tokens")
    ids = prompt_token_ids(tokenizer, text)
    return to_host(embed_tokens(params, jax.device_put(np.asarray(ids, np.int32)))).astype(np.float32)  # the table may span processes


def random_soft_prompt(params: Params, num_rows: int, seed: int) -> np.ndarray:
    """Rows copied from `num_rows` random vocabulary embeddings."""
    if num_rows < 1:
        raise DroJaxError(f"a soft prompt needs at least one row, got {num_rows}")
    table = params["embed_tokens"]["weight"]
    ids = np.random.default_rng(seed).choice(table.shape[0], size=num_rows, replace=False)
    return to_host(table[ids]).astype(np.float32)
