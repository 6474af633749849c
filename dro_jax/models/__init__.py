"""Functional Llama-family transformers: the model as a pure function of its parameter pytree."""

from dro_jax.models.config import ModelConfig, RopeScaling
from dro_jax.models.inputs import embed_tokens, final_states, input_embeddings, insert_soft_prompt
from dro_jax.models.transformer import KVCache, ModelOutput, Transformer, compute_logits, forward, init_params, param_shapes

__all__ = [
    "ModelConfig", "RopeScaling", "KVCache", "ModelOutput", "Transformer", "compute_logits", "embed_tokens", "final_states",
    "forward", "init_params", "input_embeddings", "insert_soft_prompt", "param_shapes",
]
