"""Soft prompts: trainable input-embedding rows that fill the system-message slot (their files and initial values;
`dro_jax.models.inputs` splices them into the model's input).

Files use the published DRO format: safetensors with one float tensor
`soft_prompt` of shape [N, hidden].
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.common.files import atomic_output, check_writable
from dro_jax.inference.chat import ChatFormatter, PromptSetting, resolve_system_prompt
from dro_jax.models.inputs import embed_tokens
from dro_jax.models.transformer import Params
from dro_jax.parallel.sharding import to_host

TENSOR_NAME = "soft_prompt"
SOFT_PREFIX = "soft:"


def save_soft_prompt(path: str | Path, soft_prompt: np.ndarray, metadata: dict[str, str] | None = None) -> Path:
    """Writes [N, hidden] float32 rows atomically (never a half-written file)."""
    from safetensors.numpy import save_file

    path = check_writable(path)
    rows = np.ascontiguousarray(np.asarray(soft_prompt, np.float32))
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise DroJaxError(f"a soft prompt is [N, hidden] with N >= 1, got shape {rows.shape}")
    with atomic_output(path) as tmp:
        save_file({TENSOR_NAME: rows}, str(tmp), metadata=metadata)
    return path


def load_soft_prompt(path: str | Path, hidden_size: int | None = None) -> np.ndarray:
    """Reads a soft-prompt file as float32 [N, hidden]; checks the width against `hidden_size`."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise DroJaxError(f"{path}: no such soft-prompt file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise DroJaxError(f"{path}: not a readable safetensors file ({err})") from None
    if TENSOR_NAME not in tensors:
        raise DroJaxError(f"{path}: no tensor named '{TENSOR_NAME}' (found: {', '.join(sorted(tensors)) or 'none'})")
    rows = np.asarray(tensors[TENSOR_NAME], np.float32)
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise DroJaxError(f"{path}: '{TENSOR_NAME}' must be [N, hidden] with N >= 1, got shape {tuple(rows.shape)}")
    if hidden_size is not None and rows.shape[1] != hidden_size:
        raise DroJaxError(
            f"{path}: the soft prompt is {rows.shape[1]} wide but the model's hidden size is {hidden_size}; "
            "it was trained for a different model"
        )
    if not np.all(np.isfinite(rows)):
        raise DroJaxError(f"{path}: the soft prompt contains NaN or inf")
    return rows


def parse_prompt_setting(spec: str, hidden_size: int | None = None) -> PromptSetting:
    """`none`, a safety-prompt name, `soft:FILE` (a soft-prompt file) or custom text."""
    if spec.startswith(SOFT_PREFIX):
        return PromptSetting.soft(spec, load_soft_prompt(spec[len(SOFT_PREFIX) :], hidden_size))
    return PromptSetting.from_text(spec)


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
