"""Functional Llama-family transformers."""

from dro_jax.models.config import ModelConfig, RopeScaling
from dro_jax.models.transformer import KVCache, ModelOutput, Transformer, embed_tokens, forward, init_params, compute_logits, param_shapes

__all__ = ["ModelConfig", "RopeScaling", "KVCache", "ModelOutput", "compute_logits", "Transformer", "embed_tokens", "forward", "init_params", "param_shapes"]
