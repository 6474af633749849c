"""The shardings of the Llama-family parameters on a mesh, from the logical axes each weight declares
(`dro_jax.models.transformer.param_axes`).

Weights keep HF's [out, in] layout with the layers stacked first, so e.g.
`q_proj` is [layers, heads * head_dim, hidden] -> ("layers", "heads", "embed"):
on a mesh with `model` and `fsdp` axes its rows are split by heads and its
columns by the FSDP axis (`dro_jax.parallel.sharding.AXIS_RULES`). Heads are
split only in whole key-value groups, so a device holds the queries of the
keys it holds; norms and the layer axis are never split. Where a count does
not divide over its mesh axis (e.g. 8 key-value groups over `model=16`), the
weights of that axis stay whole on every device, with one warning per axis.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding

from dro_jax.models.config import ModelConfig
from dro_jax.models.transformer import Params, param_axes, param_shapes
from dro_jax.parallel.sharding import logical_spec, place, warn_once, whole_dimensions

def logical_axes(config: ModelConfig) -> dict[tuple[str, ...], tuple[str | None, ...]]:
    """Each parameter's logical axes by its path in the tree (the layer axis included), as `transformer.py` declares
    them beside each weight."""
    flat = jax.tree_util.tree_flatten_with_path(param_axes(config), is_leaf=lambda x: isinstance(x, tuple))[0]
    return {tuple(k.key for k in path): axes for path, axes in flat}


def axis_units(config: ModelConfig) -> dict[str | None, int]:
    """How many indivisible units each logical axis has: query heads count in key-value groups."""
    return {
        "vocab": config.vocab_size, "embed": config.hidden_size, "mlp": config.intermediate_size,
        "heads": config.num_kv_heads, "kv_heads": config.num_kv_heads, "layers": config.num_layers, None: 1,
    }


def _layout_shape(mesh: Mesh, serving: bool) -> dict[str, int]:
    """The mesh axes a layout splits weights over: all of them, or for serving all but `fsdp`."""
    return {axis: size for axis, size in mesh.shape.items() if not (serving and axis == "fsdp")}


def param_shardings(config: ModelConfig, mesh: Mesh, serving: bool = False) -> Params:
    """A tree like the parameters with the `NamedSharding` of each on `mesh`. `serving`: the layout for
    generation, whole along the `fsdp` axis (split over `model` only), so that decoding a token gathers no weights
    (FSDP's layout would gather every layer's weights at every new token)."""
    units = axis_units(config)
    mesh_shape = _layout_shape(mesh, serving)
    declared = logical_axes(config)

    def sharding(key_path, _shape) -> NamedSharding:
        axes = declared[tuple(k.key for k in key_path)]
        return NamedSharding(mesh, logical_spec(mesh_shape, axes, [units[a] for a in axes]))

    return jax.tree_util.tree_map_with_path(sharding, param_shapes(config))


_COUNTED_AS = {"vocab": "a vocabulary of {} does", "embed": "a hidden size of {} does", "mlp": "an MLP width of {} does",
               "heads": "{} key-value groups do", "kv_heads": "{} key-value groups do"}


def unsplit_weights(config: ModelConfig, mesh_shape: dict[str, int]) -> list[str]:
    """One line per logical axis whose count does not divide over its mesh axes, naming the weights kept whole."""
    units = axis_units(config)
    families: dict[tuple[str, int, str], list[str]] = {}
    for path, axes in logical_axes(config).items():
        for name, count, over in whole_dimensions(mesh_shape, axes, [units[a] for a in axes]):
            family = _COUNTED_AS[name].format(count)
            families.setdefault((family, over), []).append(path[-2] if path[0] == "layers" else path[0])
    return [f"{family} not divide over {over}: {', '.join(sorted(set(names)))} kept whole along it on every device"
            for (family, over), names in families.items()]


def serving_fits(config: ModelConfig, mesh: Mesh, dtype_bytes: int) -> bool:
    """Whether the serving layout's weights take at most half of a device's memory (the rest is for the KV cache
    and the FSDP copy); True where the backend does not say (CPUs)."""
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    return limit is None or config.num_parameters * dtype_bytes / mesh.shape.get("model", 1) <= limit / 2


def place_params(params: Params, config: ModelConfig, mesh: Mesh | None, serving: bool = False) -> Params:
    """The parameters on `mesh` as `param_shardings` splits them (no transfer where they already are);
    without a mesh, as they are. `serving` asks for generation's layout where it fits (`serving_fits`; else
    FSDP's, with a warning)."""
    if mesh is None:
        return params
    if serving and mesh.shape.get("fsdp", 1) > 1:
        dtype_bytes = jax.tree.leaves(params)[0].dtype.itemsize
        if not serving_fits(config, mesh, dtype_bytes):
            warn_once("the weights do not fit whole along the fsdp axis: generation gathers them at every new token "
                      "(a larger model axis, --mesh model=M, avoids it)")
            serving = False
    for line in unsplit_weights(config, _layout_shape(mesh, serving)):
        warn_once(line)
    return place(params, param_shardings(config, mesh, serving))
