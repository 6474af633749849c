"""One configuration dataclass for every supported Llama-family architecture.

`llama` (Llama-2, CodeLlama, Vicuna, Orca-2, SmolLM2), `mistral` (Mistral,
openchat-3.5) and `qwen2` differ only in a few switches: attention biases, the
sliding window and the rotary scaling. They all map onto `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from dro_jax.common.errors import DroJaxError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# How attention is computed; both give the same result within float rounding (tests/models/test_attention.py).
ATTENTION_IMPLEMENTATIONS = {
    "reference": "einsums per key block in a head-major layout; the blocks join one softmax without being copied "
    "into one array, and this is the path the parity tests against transformers pin down",
    "fused": "jax.nn.dot_product_attention over the key blocks joined into one; for backends with a fused attention "
    "kernel, as it picks its own implementation (in jax 0.10 that is still XLA's on every backend)",
}


# --precision -> (jax's default matmul precision, what it means).
MATMUL_PRECISIONS = {
    "highest": ("highest", "float32 matmuls in full float32, as PyTorch's float32 (no TF32 on GPUs, no bfloat16 passes on TPUs)"),
    "default": (None, "the backend's fastest float32 matmuls: TF32 on recent NVIDIA GPUs, bfloat16 passes on TPUs; less exact"),
}


def set_matmul_precision(name: str) -> None:
    """Sets how every float32 matmul is computed from here on (jax's `jax_default_matmul_precision`, a process-wide
    setting): `highest` or `default` (MATMUL_PRECISIONS). Half-precision models are unaffected. On CPU both are exact float32."""
    if name not in MATMUL_PRECISIONS:
        raise DroJaxError(f"unknown matmul precision {name!r}; choose one of {', '.join(MATMUL_PRECISIONS)}")
    import jax  # here: the command-line parser reads this module's tables without loading jax

    jax.config.update("jax_default_matmul_precision", MATMUL_PRECISIONS[name][0])


def check_attention(name: str) -> None:
    """Raises a `DroJaxError` unless `name` is a key of ATTENTION_IMPLEMENTATIONS."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise DroJaxError(f"unknown attention implementation {name!r}; choose one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary-embedding frequency scaling (`linear` or `llama3`)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family transformer.

    Frozen and hashable, so it can be a static argument of `jax.jit`.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    attention: str = "reference"  # a key of ATTENTION_IMPLEMENTATIONS; a choice of the run, not of the checkpoint

    def __post_init__(self) -> None:
        check_attention(self.attention)
        if self.num_heads % self.num_kv_heads:
            raise DroJaxError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise DroJaxError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @property
    def num_parameters(self) -> int:
        """Parameter count, embeddings and (untied) output head included."""
        return self.embedding_parameters * (1 if self.tie_word_embeddings else 2) + self.layer_parameters * self.num_layers + self.hidden_size

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_parameters(self) -> int:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden_size * (q + 2 * kv) + q * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        return attention + mlp + 2 * self.hidden_size

    def forward_flops(self, num_tokens: int, attended_pairs: int, with_logits: bool = False, attention_factor: float = 1.0) -> float:
        """FLOPs of one forward pass: 2 per multiply-add in the matmuls.

        `attended_pairs` is the number of (query, key) pairs that attention
        scores, summed over the batch (n(n+1)/2 for a causal sequence of n);
        `attention_factor` scales their part (2 for a backward pass, below).
        """
        matmul_params = self.layer_parameters * self.num_layers
        flops = 2.0 * matmul_params * num_tokens
        flops += attention_factor * 4.0 * self.num_layers * self.num_heads * self.head_dim * attended_pairs
        if with_logits:
            flops += 2.0 * self.embedding_parameters * num_tokens
        return flops

    def pass_flops(
        self, lengths: Sequence[int], prefix_length: int = 0, batch_size: int | None = None, logit_positions: int = 0, backward: bool = False
    ) -> float:
        """FLOPs of one forward pass over sequences of `lengths` tokens (matmuls plus causal attention, padding not
        counted). With a shared prefix, its `prefix_length` tokens run once per batch of `batch_size` sequences
        (default: all in one batch) and each sequence's own tokens attend to them; `logit_positions`: how many
        positions, over all sequences, the output head is applied to. With `backward`, those of the backward pass
        to the inputs alone (frozen weights: no weight gradient): as many as the forward's in the projections and
        the head, twice as many in attention (the gradients of its queries, keys and values)."""
        factor = 2.0 if backward else 1.0
        lengths = [int(n) for n in lengths]
        batches = -(-len(lengths) // (batch_size or max(len(lengths), 1)))
        flops = 0.0
        if prefix_length:
            flops += batches * self.forward_flops(prefix_length, prefix_length * (prefix_length + 1) // 2, attention_factor=factor)
        for n in lengths:
            own = n - prefix_length
            flops += self.forward_flops(own, own * prefix_length + own * (own + 1) // 2, attention_factor=factor)
        return flops + 2.0 * self.embedding_parameters * logit_positions

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dictionary."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise DroJaxError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        activation = cfg.get("hidden_act", "silu")
        if activation != "silu":
            raise DroJaxError(f"{source}: unsupported hidden_act {activation!r}; only 'silu' is supported")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            config = dict(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            )
        except KeyError as missing:
            raise DroJaxError(f"{source}: missing required field {missing.args[0]!r}") from None
        config["rope_theta"], config["rope_scaling"] = _rope_from_hf(cfg, source)
        if model_type == "qwen2":
            if cfg.get("use_sliding_window"):
                raise DroJaxError(f"{source}: Qwen2 sliding-window attention (use_sliding_window) is not supported")
            config.update(qkv_bias=True, o_bias=False)
        else:
            bias = bool(cfg.get("attention_bias", False))
            config.update(qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)))
        if model_type == "mistral" and cfg.get("sliding_window"):
            config["sliding_window"] = int(cfg["sliding_window"])
        return cls(model_type=model_type, **config)


def _rope_from_hf(cfg: Mapping[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    """Reads rotary settings from either `rope_parameters` (transformers >= 5)
    or the older `rope_theta` + `rope_scaling` fields."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise DroJaxError(
            f"{source}: unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    return theta, RopeScaling(rope_type=rope_type, **{k: v for k, v in params.items() if k in fields and k != "rope_type"})
