"""Functional Llama-family transformers."""

from dro_jax.models.config import ModelConfig, RopeScaling
from dro_jax.models.transformer import ModelOutput, Transformer, embed_tokens, forward, init_params, param_shapes

__all__ = ["ModelConfig", "RopeScaling", "ModelOutput", "Transformer", "embed_tokens", "forward", "init_params", "param_shapes"]
