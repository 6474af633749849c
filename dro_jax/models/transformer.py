"""A functional Flax (Linen) decoder for the Llama family.

The parameter tree mirrors Hugging Face names (`embed_tokens/weight`,
`layers/self_attn/q_proj/weight`, ...) with weights in HF's [out, in] layout,
so conversion is a rename plus stacking the layers along a leading axis (the
layers run under `nn.scan`, which keeps compile time flat in depth).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dro_jax.models.config import ModelConfig
from dro_jax.models.rope import apply_rotary, rotary_tables

Params = Any  # a nested dict of arrays


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

    @classmethod
    def zeros(cls, config: ModelConfig, batch: int, slots: int, dtype: Any) -> "KVCache":
        heads = (config.num_layers, batch, config.num_kv_heads)
        return cls(jnp.zeros(heads + (config.head_dim, slots), dtype), jnp.zeros(heads + (slots, config.head_dim), dtype))


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


class Linear(nn.Module):
    """y = x W^T (+ b) with W stored as [out, in], like torch.nn.Linear."""

    features: int
    use_bias: bool
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.param_dtype)
        y = jax.lax.dot_general(x, weight.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(x.dtype)
        return y


class Embedding(nn.Module):
    """Token embedding table, also usable as a tied output head."""

    num_embeddings: int
    features: int
    param_dtype: Any

    def setup(self) -> None:
        self.weight = self.param("weight", nn.initializers.normal(0.02), (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight, token_ids, axis=0)

    def attend(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("bth,vh->btv", hidden, self.weight.astype(hidden.dtype), preferred_element_type=jnp.float32)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, scaled in the input dtype (as transformers does)."""

    eps: float
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * x32.astype(x.dtype)


def attend(query: jax.Array, key_t: jax.Array, value: jax.Array, allowed: jax.Array) -> jax.Array:
    """Grouped-query attention in the head-major layout that CPU and GPU matmuls like.

    query [b, kv_heads, group * t, d] (group-major: row g * t + i is query i
    of head g); key_t [b, kv_heads, d, s] (keys transposed: XLA's CPU batched
    matmul is many times faster without a transposed operand); value
    [b, kv_heads, s, d]; allowed [b, t, s] says
    which keys each query may see. Scores and softmax run in float32. A query
    that may see no key gets a uniform average instead of NaN (it only happens
    on padding rows, whose output is never used). Returns [b, kv_heads, group * t, d].
    """
    batch, kv_heads, rows, dim = query.shape
    steps, slots = allowed.shape[1:]
    scores = jnp.einsum("bkqd,bkds->bkqs", query, key_t, preferred_element_type=jnp.float32) * dim**-0.5
    scores = scores.reshape(batch, kv_heads, rows // steps, steps, slots)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype).reshape(batch, kv_heads, rows, slots)
    return jnp.einsum("bkqs,bksd->bkqd", probs, value)


class Attention(nn.Module):
    config: ModelConfig
    param_dtype: Any

    @nn.compact
    def __call__(self, x, cos, sin, allowed, layer_cache=None, cache_index=None):
        """Returns (output, (keys [b, kv, d, t], values [b, kv, t, d]) of the inputs).

        With `layer_cache` = this layer's cached (keys [b, kv, d, slots], values [b, kv, slots, d]),
        the inputs' keys and values are placed at slot `cache_index` and the
        queries attend over all slots (`allowed` is then [b, t, slots]); the
        caller writes the returned new entries into the cache.
        """
        c = self.config
        batch, seq, _ = x.shape
        group = c.num_heads // c.num_kv_heads
        q = Linear(c.num_heads * c.head_dim, c.qkv_bias, self.param_dtype, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, self.param_dtype, name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, c.qkv_bias, self.param_dtype, name="v_proj")(x)
        q = apply_rotary(q.reshape(batch, seq, c.num_kv_heads, group, c.head_dim), cos, sin)
        k = apply_rotary(k.reshape(batch, seq, c.num_kv_heads, c.head_dim), cos, sin)
        # Head-major layout: queries [b, kv, group * t, d], keys [b, kv, d, t], values [b, kv, t, d].
        q = q.transpose(0, 2, 3, 1, 4).reshape(batch, c.num_kv_heads, group * seq, c.head_dim)
        k = k.transpose(0, 2, 3, 1)
        v = v.reshape(batch, seq, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        keys, values = k, v
        if layer_cache is not None:
            cached_keys, cached_values = layer_cache
            keys = jax.lax.dynamic_update_slice(cached_keys, k.astype(cached_keys.dtype), (0, 0, 0, cache_index))
            values = jax.lax.dynamic_update_slice(cached_values, v.astype(cached_values.dtype), (0, 0, cache_index, 0))
            keys, values = keys.astype(x.dtype), values.astype(x.dtype)
        out = attend(q, keys, values, allowed)  # [b, kv, group * t, d]
        out = out.reshape(batch, c.num_kv_heads, group, seq, c.head_dim).transpose(0, 3, 1, 2, 4)
        out = out.reshape(batch, seq, c.num_heads * c.head_dim)
        return Linear(c.hidden_size, c.o_bias, self.param_dtype, name="o_proj")(out), (k, v)


class MLP(nn.Module):
    config: ModelConfig
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = Linear(c.intermediate_size, c.mlp_bias, self.param_dtype, name="gate_proj")(x)
        up = Linear(c.intermediate_size, c.mlp_bias, self.param_dtype, name="up_proj")(x)
        return Linear(c.hidden_size, c.mlp_bias, self.param_dtype, name="down_proj")(jax.nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm residual block; a scan body, so it returns (carry, per-layer output)."""

    config: ModelConfig
    param_dtype: Any
    collect_hidden: bool

    @nn.compact
    def __call__(self, h, cos, sin, allowed, cache_index, layer_cache):
        """Scanned over layers: `layer_cache` is this layer's slice of the KV cache (or None).

        Returns the new residual stream and, per layer, (input stream or None,
        the new keys and values or None)."""
        c, dt = self.config, self.param_dtype
        h_in = h
        attn, new_entries = Attention(c, dt, name="self_attn")(
            RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(h), cos, sin, allowed, layer_cache, cache_index
        )
        h = h + attn
        h = h + MLP(c, dt, name="mlp")(RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(h))
        return h, (h_in if self.collect_hidden else None, new_entries if layer_cache is not None else None)


def attention_allowed(key_mask: jax.Array, sliding_window: int | None, num_queries: int | None = None, first_query=0) -> jax.Array:
    """[b, t, s] booleans: causal, not padding, and inside the sliding window.

    Queries sit at slots first_query .. first_query + t - 1 of the s key slots
    (without a cache, t = s and first_query = 0).
    """
    num_queries = key_mask.shape[1] if num_queries is None else num_queries
    query_slot = first_query + jnp.arange(num_queries)[:, None]
    key_slot = jnp.arange(key_mask.shape[1])[None, :]
    allowed = (query_slot >= key_slot)[None] & key_mask.astype(bool)[:, None, :]
    if sliding_window is not None:
        allowed &= (query_slot - key_slot < sliding_window)[None]
    return allowed


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
        output_hidden_states: bool = False,
        output_logits: bool = False,
    ) -> ModelOutput:
        c = self.config
        embed = Embedding(c.vocab_size, c.hidden_size, self.param_dtype, name="embed_tokens")
        if inputs_embeds is None:
            h = embed(input_ids)
        else:
            h = inputs_embeds.astype(embed.weight.dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(h.shape[:2] if cache is None else (h.shape[0], cache.value.shape[3]), jnp.int32)
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            positions = positions_from_mask(attention_mask)
        cos, sin = rotary_tables(c, positions, h.dtype)
        allowed = attention_allowed(attention_mask, c.sliding_window, h.shape[1], cache_index if cache is not None else 0)

        layer = nn.remat(DecoderLayer, prevent_cse=False) if self.remat else DecoderLayer
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
            length=c.num_layers,
        )(c, self.param_dtype, output_hidden_states, name="layers")
        layer_caches = None if cache is None else (cache.key, cache.value)
        h, (per_layer, new_entries) = layers(h, cos, sin, allowed, cache_index, layer_caches)
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


def init_params(config: ModelConfig, rng: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (for tests and shape inference); real ones come from `dro_jax.loading`."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return Transformer(config, param_dtype=dtype).init(rng, ids, output_logits=True)["params"]


def param_shapes(config: ModelConfig, dtype: Any = jnp.float32) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s, without allocating anything."""
    return jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype))


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
    be given.
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
        output_hidden_states=output_hidden_states,
        output_logits=output_logits,
    )


def compute_logits(params: Params, config: ModelConfig, hidden: jax.Array) -> jax.Array:
    """float32 logits of final-norm hidden states [b, t, hidden] (e.g. only the last position)."""
    head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("bth,vh->btv", hidden, head["weight"].astype(hidden.dtype), preferred_element_type=jnp.float32)
