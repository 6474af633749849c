"""GGUF files (llama architecture), dequantised with the `gguf` package.

llama.cpp stores the q and k projections with their rows permuted for its
interleaved rotary layout; this module undoes that permutation so the weights
fit the rotate-half layout of the HF model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from dro_jax.common.errors import DroJaxError
from dro_jax.models.config import ModelConfig

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name_of(gguf_name: str) -> str | None:
    """HF name of a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        layer, kind, suffix = match.groups()
        return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"
    return None


def undo_rotary_permutation(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as err:  # the reader raises a variety of errors on damaged files
        raise DroJaxError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def _field(reader, key: str, path: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise DroJaxError(f"{path}: GGUF metadata {key!r} is missing")
        return default
    return field.contents()


def read_gguf_config(reader, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture", path)
    if arch != "llama":
        raise DroJaxError(f"{path}: unsupported GGUF architecture {arch!r}; only 'llama' is supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise DroJaxError(f"{path}: GGUF files with llama3 rope scaling are not supported; load the HF directory instead")
    scaling = _field(reader, "llama.rope.scaling.type", path, "none")
    if scaling not in ("none", "linear"):
        raise DroJaxError(f"{path}: unsupported GGUF rope scaling {scaling!r}")
    heads = int(_field(reader, "llama.attention.head_count", path))
    hidden = int(_field(reader, "llama.embedding_length", path))
    names = {t.name for t in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight") if "token_embd.weight" in names else None
    if embedding is None:
        raise DroJaxError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    hf = {
        "model_type": "llama",
        "vocab_size": int(embedding.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_field(reader, "llama.block_count", path)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", path, heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", path, hidden // heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", path)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", path, 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", path)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor", path))}
    return ModelConfig.from_hf_dict(hf, source=str(path))


class GGUFSource:
    """Dequantises tensors on demand and hands them out under HF names.

    A slice is cut from the whole tensor dequantised (and un-permuted, which
    mixes rows within each head), so a sharded load dequantises each tensor
    once per distinct part this process's devices hold: GGUF files are meant
    for models that fit one host, and loading them sharded spends time, not
    memory beyond one dequantised tensor.
    """

    def __init__(self, reader, path: Path, config: ModelConfig):
        self.description = str(path)
        self._config = config
        self._tensors = {}
        for tensor in reader.tensors:
            name = hf_name_of(tensor.name)
            if name is not None:
                self._tensors[name] = tensor

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(n) for n in reversed(self._tensors[name].shape))  # GGUF lists the fastest axis first

    def read_slice(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self._read(name)[index]

    def _read(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        try:
            weight = dequantize(tensor.data, tensor.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise DroJaxError(f"{self.description}: cannot dequantise {tensor.name} ({err})") from None
        if name.endswith("self_attn.q_proj.weight"):
            weight = undo_rotary_permutation(weight, self._config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            weight = undo_rotary_permutation(weight, self._config.num_kv_heads)
        return weight
