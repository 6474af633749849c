"""Checkpoint loading: HF safetensors directories, GGUF files and packaged model names."""

from dro_jax.loading.registry import DEFAULT_MODEL, PACKAGED_MODELS, LoadedModel, load_model, resolve_model_path

__all__ = ["DEFAULT_MODEL", "PACKAGED_MODELS", "LoadedModel", "load_model", "resolve_model_path"]
