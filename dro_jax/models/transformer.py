"""A functional Flax (Linen) decoder for the Llama family.

The parameter tree mirrors Hugging Face names (`embed_tokens/weight`,
`layers/self_attn/q_proj/weight`, ...) with weights in HF's [out, in] layout,
so conversion is a rename plus stacking the layers along a leading axis (the
layers run under `nn.scan`, which keeps compile time flat in depth).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dro_jax.models.config import ModelConfig
from dro_jax.models.rope import apply_rotary, rotary_tables
from dro_jax.parallel.sharding import constrain

Params = Any  # a nested dict of arrays
# Logical axes of activations (see dro_jax.parallel.sharding): the residual stream is split by rows only; attention
# tensors in the head-major layout [b, kv_heads, rows, d] (keys [b, kv_heads, d, t]) by rows and key-value heads.
STREAM = ("batch", None, None)
HEAD_MAJOR = ("batch", "kv_heads", None, None)


@flax.struct.dataclass
class KVCache:
    """Keys [layers, batch, kv_heads, head_dim, slots] (transposed, see `attend`) and
    values [layers, batch, kv_heads, slots, head_dim] of every layer.

    Slots are sized for one generation (longest prompt + new tokens), not the
    model's context. Slot i of every row holds the i-th token of the padded
    batch, so all rows write at the same index.
    """

    key: jax.Array
    value: jax.Array
    length: jax.Array | None = None  # [] for a shared prefix padded past its tokens: the slots before it are real

    @property
    def filled(self) -> jax.Array | int:
        """How many leading slots hold tokens: `length`, or every slot."""
        return self.key.shape[-1] if self.length is None else self.length

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, slots: int, dtype: Any) -> "KVCache":
        heads = (config.num_layers, batch, config.num_kv_heads)
        axes = (None, "batch", "kv_heads", None, None)  # split like the attention that writes it
        key = constrain(jnp.zeros(heads + (config.head_dim, slots), dtype), axes)
        return cls(key, constrain(jnp.zeros(heads + (slots, config.head_dim), dtype), axes))


@flax.struct.dataclass
class ModelOutput:
    """What `forward` returns.

    last_hidden_state: [batch, seq, hidden], after the final RMSNorm (HF's
        `hidden_states[-1]`).
    hidden_states: [num_layers + 1, batch, seq, hidden] or None. Entry i is the
        residual stream entering layer i (0 = input embeddings); the last entry
        is the final layer's output before the final norm.
    logits: [batch, seq, vocab] in float32, or None.
    cache: the updated `KVCache` when one was given, else None.
    """

    last_hidden_state: jax.Array
    hidden_states: jax.Array | None = None
    logits: jax.Array | None = None
    cache: KVCache | None = None


def _param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...], dtype: Any, axes: tuple[str | None, ...]) -> jax.Array:
    """A parameter declared with the logical axis of each dimension (`param_axes` reads them; the mesh rules in
    `dro_jax.parallel.sharding` map them to mesh axes)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored as [out, in], like torch.nn.Linear; `axes` are W's logical axes (out, in).

    A bias is split like W's rows, except along `embed` (the hidden size, which splits weights for FSDP but not
    the activations a bias adds to): that one stays whole."""

    features: int
    use_bias: bool
    param_dtype: Any
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = _param(self, "weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.param_dtype, self.axes)
        y = jax.lax.dot_general(x, weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        if self.use_bias:
            rows = None if self.axes[0] == "embed" else self.axes[0]
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,), self.param_dtype, (rows,)).astype(x.dtype)
        return y


class Embedding(nn.Module):
    """Token embedding table, also usable as a tied output head."""

    num_embeddings: int
    features: int
    param_dtype: Any

    def setup(self) -> None:
        self.weight = _param(self, "weight", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.param_dtype, ("vocab", "embed"))

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight, token_ids, axis=0)

    def attend(self, hidden: jax.Array) -> jax.Array:
        return head_logits(self.weight, hidden)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as transformers does)."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = _param(self, "weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype, (None,))  # never split
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * x32.astype(x.dtype)


class KeyBlock(NamedTuple):
    """Keys one query block attends to: key_t [b, kv_heads, d, s] (transposed) and value [b, kv_heads, s, d],
    or [kv_heads, d, s] / [kv_heads, s, d] when every row shares them (a shared prefix); allowed [b, t, s]
    says which keys each query may see (None: all)."""

    key_t: jax.Array
    value: jax.Array
    allowed: jax.Array | None


def joined_mask(blocks: list[KeyBlock], batch: int) -> jax.Array:
    """[b, t, keys of all blocks in order]: which keys each query may see (all of a block without a mask)."""
    steps = blocks[-1].allowed.shape[1]  # the last block is the inputs' own keys, always masked
    allowed = [jnp.ones((batch, steps, block.key_t.shape[-1]), bool) if block.allowed is None else block.allowed for block in blocks]
    return jnp.concatenate(allowed, axis=-1) if len(allowed) > 1 else allowed[0]


def attend(query: jax.Array, blocks: list[KeyBlock]) -> jax.Array:
    """Grouped-query attention in the head-major layout that CPU and GPU matmuls like.

    query [b, kv_heads, group * t, d] (group-major: row g * t + i is query i
    of head g). The keys come in blocks (a shared prefix, a KV cache, the
    inputs' own keys) that join one softmax without being copied together; a
    shared block has no batch axis. Scores and softmax run in float32, and so
    does everything of a shared block: its gradient is a sum over the rows (and,
    on a mesh, across devices), which a half-precision model would otherwise
    take in half precision. A query that may see no key gets a uniform average
    instead of NaN (it only happens on padding rows, whose output is never
    used). Returns [b, kv_heads, group * t, d] in the query's dtype.
    """
    batch, kv_heads, rows, dim = query.shape
    allowed = joined_mask(blocks, batch)
    steps, total = allowed.shape[1:]
    scores = []
    for block in blocks:
        if block.key_t.ndim == 3:  # shared: float32 (XLA:CPU has no bfloat16 kernel for this contraction either)
            scores.append(_times_shared(query, block.key_t))
        else:
            scores.append(jnp.einsum("bkqd,bkds->bkqs", query, block.key_t, preferred_element_type=jnp.float32))
    scores = jnp.concatenate(scores, axis=-1) if len(scores) > 1 else scores[0]
    scores = (scores * dim**-0.5).reshape(batch, kv_heads, rows // steps, steps, total)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch, kv_heads, rows, total)
    out, start = 0, 0
    for block in blocks:
        slots = block.key_t.shape[-1]
        weights = probs[..., start : start + slots]
        if block.value.ndim == 3:
            out = out + _times_shared(weights, block.value)
        else:
            out = out + jnp.einsum("bkqs,bksd->bkqd", weights.astype(block.value.dtype), block.value)
        start += slots
    return out.astype(query.dtype)


def _times_shared(rows: jax.Array, shared: jax.Array) -> jax.Array:
    """rows [b, kv_heads, n, x] times a shared block's keys or values [kv_heads, x, y]: [b, kv_heads, n, y], in
    float32. One matmul per key-value head over the rows of the whole batch: XLA:CPU ran the same product as an
    einsum with the block broadcast over the batch 1.3-1.5x slower (`tools/shared_block_product.py` times both)."""
    batch, kv_heads, count, _ = rows.shape
    stacked = rows.astype(jnp.float32).transpose(1, 0, 2, 3).reshape(kv_heads, batch * count, -1)
    product = jnp.matmul(stacked, shared.astype(jnp.float32))
    return product.reshape(kv_heads, batch, count, -1).transpose(1, 0, 2, 3)


def attend_fused(query: jax.Array, blocks: list[KeyBlock]) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention`, which a backend may run as one fused kernel.

    Same arguments and result as `attend`. The function takes one key and one
    value array [b, s, kv_heads, d], so the blocks are turned token-major, a
    shared block is broadcast over the batch, and all are joined along s; the
    query rows become heads kv * group + g, HF's order, which is also the
    function's grouping of query heads onto key heads. It picks its own
    implementation (`implementation=None`). A query that may see no key (a
    padding row) may see every key instead: an empty softmax is NaN in a
    kernel that does not guard it, and NaN would reach the gradient even
    though that row's output is never used.
    """
    batch, kv_heads, rows, dim = query.shape
    allowed = joined_mask(blocks, batch)
    steps = allowed.shape[1]
    allowed = allowed | ~allowed.any(axis=-1, keepdims=True)
    keys = jnp.concatenate([_token_major(block.key_t, batch, (0, 3, 1, 2)).astype(query.dtype) for block in blocks], axis=1)
    values = jnp.concatenate([_token_major(block.value, batch, (0, 2, 1, 3)).astype(query.dtype) for block in blocks], axis=1)
    query = query.reshape(batch, kv_heads, rows // steps, steps, dim).transpose(0, 3, 1, 2, 4).reshape(batch, steps, -1, dim)
    out = jax.nn.dot_product_attention(query, keys, values, mask=allowed[:, None], implementation=None)
    return out.reshape(batch, steps, kv_heads, rows // steps, dim).transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, rows, dim)


def _token_major(array: jax.Array, batch: int, axes: tuple[int, ...]) -> jax.Array:
    """A block's keys or values as [b, s, kv_heads, d]; `axes` reorders a batched block's axes, and a shared
    block (no batch axis) is broadcast over the batch."""
    array = (array[None] if array.ndim == 3 else array).transpose(axes)
    return jnp.broadcast_to(array, (batch, *array.shape[1:]))


# ModelConfig.attention -> the function computing attention (see config.ATTENTION_IMPLEMENTATIONS for why each).
ATTENTION_FUNCTIONS = {"reference": attend, "fused": attend_fused}

# A shared prefix padded past its tokens is read only up to the first of the widths PREFIX_CHUNK, 2 x PREFIX_CHUNK,
# 4 x PREFIX_CHUNK, ... that holds its tokens (see `attend_filled_prefix`).
PREFIX_CHUNK = 32


def prefix_widths(slots: int) -> list[int]:
    """The widths a padded prefix of `slots` slots may be read at: doubling from PREFIX_CHUNK, then `slots`."""
    widths = [PREFIX_CHUNK]
    while widths[-1] * 2 < slots:
        widths.append(widths[-1] * 2)
    return widths + [slots] if widths[-1] < slots else widths


def attend_filled_prefix(
    attention: Callable[[jax.Array, list[KeyBlock]], jax.Array], query: jax.Array, blocks: list[KeyBlock], filled: jax.Array
) -> jax.Array:
    """`attention(query, blocks)` where blocks[0] is a shared prefix whose slots from `filled` on are padding: only
    its first `prefix_widths` width that holds the filled slots is read.

    A padded prefix lets prompts of different lengths share one compiled
    program, but every query would then attend to all its slots (128 for a
    24-token chat template). One `lax.switch` branch per width, all in the
    same program, picks the narrowest at run time; doubling widths keep the
    branches (each compiled) few.
    """
    prefix, rest = blocks[0], blocks[1:]
    widths = prefix_widths(prefix.key_t.shape[-1])

    def cut(width: int):
        return lambda query, prefix, rest: attention(
            query, [KeyBlock(prefix.key_t[..., :width], prefix.value[..., :width, :], prefix.allowed[..., :width]), *rest]
        )

    branch = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), filled), len(widths) - 1)  # the first width >= filled
    return jax.lax.switch(branch, [cut(width) for width in widths], query, prefix, rest)


class Attention(nn.Module):
    config: ModelConfig
    param_dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, masks, layer_cache=None, layer_prefix=None):
        """Returns (output, (keys [b, kv, d, t], values [b, kv, t, d]) of the inputs).

        The queries attend to the inputs' own keys, to this layer's cached
        (keys [b, kv, d, slots], values [b, kv, slots, d]) when given, and to
        this layer's shared prefix (keys [1, kv, d, p], values [1, kv, p, d])
        when given, as `masks` (an `AttentionMasks`) allows; the caller writes
        the returned new entries into the cache.
        """
        c = self.config
        batch, seq, _ = x.shape
        group = c.num_heads // c.num_kv_heads
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, self.param_dtype, ("heads", "embed"), name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, self.param_dtype, ("kv_heads", "embed"), name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, self.param_dtype, ("kv_heads", "embed"), name="v_proj")(x)
        q = apply_rotary(q.reshape(batch, seq, c.num_kv_heads, group, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(batch, seq, c.num_kv_heads, c.head_dim), cos, sin)
        # Head-major layout: queries [b, kv, group * t, d], keys [b, kv, d, t], values [b, kv, t, d].
        q = q.transpose(0, 2, 3, 1, 4).reshape(batch, c.num_kv_heads, group * seq, c.head_dim)
        k = k.transpose(0, 2, 3, 1)
        v = v.reshape(batch, seq, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        q, k, v = (constrain(t, HEAD_MAJOR) for t in (q, k, v))
        blocks = []
        if layer_prefix is not None:
            # The prefix's keys and values stay float32 (see `attend`).
            blocks.append(KeyBlock(layer_prefix[0][0], layer_prefix[1][0], masks.prefix))
        if masks.cache is not None:
            blocks.append(KeyBlock(layer_cache[0].astype(x.dtype), layer_cache[1].astype(x.dtype), masks.cache))
        blocks.append(KeyBlock(k, v, masks.own))
        attention = ATTENTION_FUNCTIONS[c.attention]
        if masks.prefix_filled is None:
            out = attention(q, blocks)
        else:
            out = attend_filled_prefix(attention, q, blocks, masks.prefix_filled)
        out = constrain(out, HEAD_MAJOR)  # [b, kv, group * t, d]
        out = out.reshape(batch, c.num_kv_heads, group, seq, c.head_dim).transpose(0, 3, 1, 2, 4)
        out = out.reshape(batch, seq, c.num_heads * c.head_dim)
        return Linear(c.hidden_size, c.o_bias, self.param_dtype, ("embed", "heads"), name="o_proj")(out), (k, v)


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = Linear(c.intermediate_size, c.mlp_bias, self.param_dtype, ("mlp", "embed"), name="gate_proj")(x)
        up = Linear(c.intermediate_size, c.mlp_bias, self.param_dtype, ("mlp", "embed"), name="up_proj")(x)
        inner = constrain(jax.nn.silu(gate) * up, ("batch", None, "mlp"))
        return Linear(c.hidden_size, c.mlp_bias, self.param_dtype, ("embed", "mlp"), name="down_proj")(inner)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; a scan body, so it returns (carry, per-layer output)."""

    config: ModelConfig
    param_dtype: Any
    collect_hidden: bool
    write_cache: bool

    @nn.compact
    def __call__(self, h, cos, sin, masks, layer_cache, layer_prefix):
        """Scanned over layers: `layer_cache` and `layer_prefix` are this layer's slices of the KV cache
        and of the shared prefix's keys and values (or None).

        Returns the new residual stream and, per layer, (input stream or None,
        the new keys and values or None)."""
        c, dt = self.config, self.param_dtype
        h_in = h
        attn, new_entries = Attention(c, dt, name="self_attn")(
            RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(h), cos, sin, masks, layer_cache, layer_prefix
        )
        h = h + attn
        h = h + MLP(c, dt, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(h))
        return constrain(h, STREAM), (h_in if self.collect_hidden else None, new_entries if self.write_cache else None)


class AttentionMasks(NamedTuple):
    """Which keys each query may see, per key block: [b, t, p] of the shared prefix, [b, t, slots] of the
    KV cache, [b, t, t] of the inputs' own keys (None: the block is absent, or for the prefix, all allowed)."""

    prefix: jax.Array | None
    cache: jax.Array | None
    own: jax.Array
    prefix_filled: jax.Array | None = None  # [] the prefix's real slots, when it is padded past them


def attention_masks(
    attention_mask: jax.Array,
    positions: jax.Array,
    sliding_window: int | None,
    cache_index: jax.Array | int | None = None,
    prefix_length: jax.Array | int = 0,
    structure: jax.Array | None = None,
    prefix_slots: int | None = None,
) -> AttentionMasks:
    """Causal, not padding, and inside the sliding window (measured in positions, so padding between a
    shared prefix and a row's own tokens does not count).

    Without a cache (`cache_index` None), `attention_mask` [b, t] marks the
    inputs' real tokens. With one, it covers every cache slot [b, slots] and
    the inputs sit at slots cache_index .. cache_index + t - 1; the slots
    before cache_index are the cache block. Queries and their own keys are at
    `positions` [b, t]; a prefix holds positions 0 .. prefix_length - 1 in its
    first slots of `prefix_slots` (default: as many as its tokens; the slots
    after them are padding, so that prefixes of different lengths share one
    compiled shape).
    `structure` [t, t] says which of the inputs' own tokens each may see
    (default: the earlier ones and itself; a tree lets several continuations
    of the same context share one row).
    """
    steps = positions.shape[1]
    if cache_index is None:
        own_mask = attention_mask
    else:
        own_mask = jax.lax.dynamic_slice_in_dim(attention_mask, cache_index, steps, axis=1)
    structure = jnp.tril(jnp.ones((steps, steps), bool)) if structure is None else structure
    own = structure[None] & own_mask.astype(bool)[:, None, :]
    inside = (lambda key_positions: positions[:, :, None] - key_positions < sliding_window) if sliding_window else None
    if inside is not None:
        own &= inside(positions[:, None, :])
    cache = None
    if cache_index is not None and not (isinstance(cache_index, int) and cache_index == 0):  # a cache filled before
        slots = attention_mask.shape[1]
        cache = (jnp.arange(slots) < cache_index)[None, None, :] & attention_mask.astype(bool)[:, None, :]
        cache = jnp.broadcast_to(cache, (positions.shape[0], steps, slots))
        if inside is not None:
            cache &= inside((prefix_length + positions_from_mask(attention_mask))[:, None, :])
    prefix = None
    padded = prefix_slots is not None and not (isinstance(prefix_length, int) and prefix_length == prefix_slots)
    slots = prefix_length if prefix_slots is None else prefix_slots
    if slots and (padded or inside is not None):
        keys = jnp.arange(slots)[None, None, :]
        prefix = jnp.broadcast_to(keys < prefix_length, (positions.shape[0], steps, slots))
        if inside is not None:
            prefix &= inside(keys)
    cut_to_filled = padded and slots > PREFIX_CHUNK
    return AttentionMasks(prefix, cache, own, prefix_length if cut_to_filled else None)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that count only real tokens, for left or right padding."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1, 0)


class Transformer(nn.Module):
    """Llama / Mistral / Qwen2 decoder; see `forward` for the functional entry point."""

    config: ModelConfig
    param_dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        prefix: KVCache | None = None,
        structure: jax.Array | None = None,
        output_hidden_states: bool = False,
        output_logits: bool = False,
    ) -> ModelOutput:
        c = self.config
        embed = Embedding(c.vocab_size, c.hidden_size, self.param_dtype, name="embed_tokens")
        if inputs_embeds is None:
            h = embed(input_ids)
        else:
            h = inputs_embeds.astype(embed.weight.dtype)
        h = constrain(h, STREAM)
        if attention_mask is None:
            attention_mask = jnp.ones(h.shape[:2] if cache is None else (h.shape[0], cache.value.shape[3]), jnp.int32)
        if positions is None:
            if cache is not None or prefix is not None:
                raise ValueError("positions are required with a cache or a shared prefix")
            positions = positions_from_mask(attention_mask)
        cos, sin = rotary_tables(c, positions, h.dtype)
        masks = attention_masks(
            attention_mask, positions, c.sliding_window, None if cache is None else cache_index,
            0 if prefix is None else prefix.filled, structure, None if prefix is None else prefix.key.shape[-1],
        )

        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},  # the stacked layer axis, first, in every layer weight's axes
        )(c, self.param_dtype, output_hidden_states, cache is not None, name="layers")
        layer_caches = None if masks.cache is None else (cache.key, cache.value)
        layer_prefixes = None if prefix is None else (prefix.key, prefix.value)  # the blocks, not the length
        h, (per_layer, new_entries) = layers(h, cos, sin, masks, layer_caches, layer_prefixes)
        if cache is not None:  # one in-place write of every layer's new keys and values
            new_keys, new_values = new_entries
            cache = KVCache(
                jax.lax.dynamic_update_slice(cache.key, new_keys.astype(cache.key.dtype), (0, 0, 0, 0, cache_index)),
                jax.lax.dynamic_update_slice(cache.value, new_values.astype(cache.value.dtype), (0, 0, 0, cache_index, 0)),
            )
        hidden_states = jnp.concatenate([per_layer, h[None]], axis=0) if output_hidden_states else None
        h_final = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(h)

        logits = None
        if output_logits:
            head = embed if c.tie_word_embeddings else Embedding(c.vocab_size, c.hidden_size, self.param_dtype, name="lm_head")
            logits = head.attend(h_final)
        return ModelOutput(last_hidden_state=h_final, hidden_states=hidden_states, logits=logits, cache=cache)


def _boxed_params(config: ModelConfig, rng: jax.Array, dtype: Any) -> Params:
    """Random parameters, each in a box that carries its logical axes."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return Transformer(config, param_dtype=dtype).init(rng, ids, output_logits=True)["params"]


def init_params(config: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (for tests and shape inference); real ones come from `dro_jax.loading`."""
    return nn.unbox(_boxed_params(config, rng, dtype))


@functools.lru_cache(maxsize=None)  # traced once per config: every placement of the weights asks again
def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything (shared: do not change it)."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


@functools.lru_cache(maxsize=None)
def param_axes(config: ModelConfig) -> Params:
    """A tree like the parameters with each one's logical axes (a tuple, one name or None per dimension), as its
    module declares them; without allocating anything (shared: do not change it)."""
    boxed = jax.eval_shape(lambda: _boxed_params(config, jax.random.key(0), jnp.float32))
    return jax.tree.map(lambda box: tuple(box.names), boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def forward(
    params: Params,
    config: ModelConfig,
    input_ids: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    cache_index: jax.Array | int = 0,
    prefix: KVCache | None = None,
    structure: jax.Array | None = None,
    output_hidden_states: bool = False,
    output_logits: bool = False,
    remat: bool = False,
) -> ModelOutput:
    """Runs the model as a pure function of `params`.

    Give `input_ids` [b, t] or `inputs_embeds` [b, t, hidden], and an
    `attention_mask` [b, t] (1 = token, 0 = padding; left or right padding).
    Position ids default to the count of real tokens before each position.
    With a `KVCache`, the inputs are written at slots `cache_index` onwards,
    `attention_mask` covers all cache slots [b, slots], and `positions` must
    be given. With `prefix`, a batch-1 `KVCache` of p tokens that every row
    continues (positions 0 .. p - 1, in its first `filled` slots; see
    `dro_jax.models.inputs`), every row
    also attends to it, and `positions` must be given. `structure` [t, t]
    replaces the causal order among the inputs' own tokens (e.g. a tree).
    Wrap with `jax.jit(..., static_argnames=("config", "output_hidden_states",
    "output_logits", "remat"))`; a fixed padded shape never retraces.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    model = Transformer(config, remat=remat)
    return model.apply(
        {"params": params},
        input_ids,
        attention_mask,
        inputs_embeds=inputs_embeds,
        positions=positions,
        cache=cache,
        cache_index=cache_index,
        prefix=prefix,
        structure=structure,
        output_hidden_states=output_hidden_states,
        output_logits=output_logits,
    )


def compute_logits(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits of final-norm hidden states [b, t, hidden] (e.g. only the last position)."""
    head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return head_logits(head["weight"], hidden)


def head_logits(weight: jax.Array, hidden: jax.Array) -> jax.Array:
    """float32 logits [b, t, vocab] of hidden [b, t, hidden] through a [vocab, hidden] head, split like the head.

    The product runs in the head's dtype (accumulated in float32): float32 states of a bfloat16 model (the DRO
    loss's) are its own bfloat16 values widened, so rounding them back loses nothing, while widening the head
    would copy the whole [vocab, hidden] matrix in float32 (gathered so under FSDP)."""
    logits = jnp.einsum("bth,vh->btv", hidden.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", None, "vocab"))
