"""Which logical axis each dimension of each Llama-family parameter is, and the shardings that follow on a mesh.

Weights keep HF's [out, in] layout with the layers stacked first, so e.g.
`q_proj` is [layers, heads * head_dim, hidden] -> ("layers", "heads", "embed"):
on a mesh with `model` and `fsdp` axes its rows are split by heads and its
columns by the FSDP axis (`dro_jax.parallel.sharding.AXIS_RULES`). Heads are
split only in whole key-value groups, so a device holds the queries of the
keys it holds; norms and the layer axis are never split.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding

from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, param_shapes
from dro_jax.parallel.sharding import logical_spec, place

# Logical axes of a parameter's dimensions, keyed by its path in the tree (the layer axis included).
PARAM_AXES: dict[tuple[str, ...], tuple[str | None, ...]] = {
    ("embed_tokens", "weight"): ("vocab", "embed"),
    ("lm_head", "weight"): ("vocab", "embed"),
    ("norm", "weight"): (None,),
    ("layers", "input_layernorm", "weight"): ("layers", None),
    ("layers", "post_attention_layernorm", "weight"): ("layers", None),
    ("layers", "self_attn", "q_proj", "weight"): ("layers", "heads", "embed"),
    ("layers", "self_attn", "q_proj", "bias"): ("layers", "heads"),
    ("layers", "self_attn", "k_proj", "weight"): ("layers", "kv_heads", "embed"),
    ("layers", "self_attn", "k_proj", "bias"): ("layers", "kv_heads"),
    ("layers", "self_attn", "v_proj", "weight"): ("layers", "kv_heads", "embed"),
    ("layers", "self_attn", "v_proj", "bias"): ("layers", "kv_heads"),
    ("layers", "self_attn", "o_proj", "weight"): ("layers", "embed", "heads"),
    ("layers", "self_attn", "o_proj", "bias"): ("layers", None),
    ("layers", "mlp", "gate_proj", "weight"): ("layers", "mlp", "embed"),
    ("layers", "mlp", "gate_proj", "bias"): ("layers", "mlp"),
    ("layers", "mlp", "up_proj", "weight"): ("layers", "mlp", "embed"),
    ("layers", "mlp", "up_proj", "bias"): ("layers", "mlp"),
    ("layers", "mlp", "down_proj", "weight"): ("layers", "embed", "mlp"),
    ("layers", "mlp", "down_proj", "bias"): ("layers", None),
}


def axis_units(config: ModelConfig) -> dict[str | None, int]:
    """How many indivisible units each logical axis has: query heads count in key-value groups."""
    return {
        "vocab": config.vocab_size, "embed": config.hidden_size, "mlp": config.intermediate_size,
        "heads": config.num_kv_heads, "kv_heads": config.num_kv_heads, "layers": config.num_layers, None: 1,
    }


def param_shardings(config: ModelConfig, mesh: Mesh) -> Params:
    """A tree like the parameters with the `NamedSharding` of each on `mesh`."""
    units = axis_units(config)
    mesh_shape = dict(mesh.shape)

    def sharding(key_path, _shape) -> NamedSharding:
        axes = PARAM_AXES[tuple(k.key for k in key_path)]
        return NamedSharding(mesh, logical_spec(mesh_shape, axes, [units[a] for a in axes]))

    return jax.tree_util.tree_map_with_path(sharding, param_shapes(config))


def place_params(params: Params, config: ModelConfig, mesh: Mesh | None) -> Params:
    """The parameters on `mesh` as `param_shardings` splits them (no transfer where they already are);
    without a mesh, as they are."""
    return params if mesh is None else place(params, param_shardings(config, mesh))
