"""Attention: T5 relative position buckets, multi-head attention with a decoding cache, masks.

Shapes: B batch, Q / K query / key length, d model dim, H heads, D head dim.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures.config import CACHE, default_kernel_init
from hypermoe_jax.layers import checkpoint_names as names

Array = jax.Array
_NEG_INF = -1e10


class RelativePositionBias(nn.Module):
    """T5 relative position buckets -> an additive attention bias ``[B|1, H, Q, K]``.

    Relative position = key position - query position. With ``bidirectional`` half of the
    buckets are for keys after the query; within a direction, half of the buckets are exact
    offsets and the rest grow logarithmically up to ``max_distance`` (beyond it: the last bucket).
    """

    num_buckets: int
    max_distance: int
    num_heads: int
    bidirectional: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @staticmethod
    def bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
               max_distance: int) -> Array:
        n = -relative_position  # > 0: the key lies before the query
        out = jnp.zeros_like(n)
        if bidirectional:
            num_buckets //= 2
            out = out + (n < 0).astype(n.dtype) * num_buckets
            n = jnp.abs(n)
        else:
            n = jnp.maximum(n, 0)
        max_exact = num_buckets // 2
        is_small = n < max_exact
        log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.log(
            max_distance / max_exact
        )
        large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(n.dtype)
        large = jnp.minimum(large, num_buckets - 1)
        return out + jnp.where(is_small, n, large)

    @nn.compact
    def __call__(self, q_positions: Array, k_positions: Array) -> Array:
        """q_positions: <int>[B|1, Q]; k_positions: <int>[B|1, K]."""
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(
                nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                (part.HEADS, part.RELPOS_BUCKETS),
            ),
            (self.num_heads, self.num_buckets),
            self.param_dtype,
        )
        rel = k_positions[:, None, :].astype(jnp.int32) - q_positions[:, :, None].astype(jnp.int32)
        buckets = self.bucket(rel, self.bidirectional, self.num_buckets, self.max_distance)
        # [H, NB] x [B, Q, K] -> [B, H, Q, K] via one-hot (a gather would be fine too).
        onehot = jax.nn.one_hot(buckets, self.num_buckets, dtype=self.dtype)
        bias = jnp.einsum("hn,bqkn->bhqk", table.astype(self.dtype), onehot)
        return part.with_logical_constraint(bias, (part.BATCH, part.HEADS, part.LENGTH, None))


class MultiHeadAttention(nn.Module):
    """Multi-head dot-product attention without biases (T5: no 1/sqrt(D) on the logits; the query
    initialiser carries it). ``decode=True``: key/value cache in the ``cache`` collection."""

    num_heads: int
    head_dim: int
    dropout_rate: float = 0.0
    float32_logits: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init

    def _proj(self, name, x, init):
        kernel = self.param(
            name,
            nn.with_logical_partitioning(init, (part.EMBED, part.HEADS, part.KV)),
            (x.shape[-1], self.num_heads, self.head_dim),
            self.param_dtype,
        )
        y = jnp.einsum("bld,dhk->blhk", x.astype(self.dtype), kernel.astype(self.dtype))
        y = part.with_logical_constraint(y, (part.BATCH, part.LENGTH, part.HEADS, part.KV))
        return names.checkpoint_name(y, names.ATTENTION_QKV)

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        mask: Array | None = None,
        bias: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        decode_index: Array | None = None,
    ) -> Array:
        """inputs_q: [B, Q, d]; inputs_kv: [B, K, d]; mask: bool [B|1, 1, Q, K];
        bias: [B|1, H|1, Q, K]. In a decode step (cache initialised, Q = K = 1) the new key and
        value go to slot ``decode_index`` and the query attends to the whole cache (``mask`` and
        ``bias`` then cover all cache slots)."""
        depth_scaling = float(self.head_dim) ** -0.5
        out_init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        in_init = nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        query_init = functools.partial(_scaled, in_init, depth_scaling)
        q = self._proj("query", inputs_q, query_init)
        k = self._proj("key", inputs_kv, in_init)
        v = self._proj("value", inputs_kv, in_init)

        if decode:
            is_initialized = self.has_variable(CACHE, "cached_key")
            cached_key = self.variable(CACHE, "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_value = self.variable(CACHE, "cached_value", jnp.zeros, v.shape, v.dtype)
            if is_initialized:
                if q.shape[1] != 1:
                    raise ValueError(
                        f"A decode step takes one token per sequence, got length {q.shape[1]}."
                    )
                index = jnp.asarray(decode_index, jnp.int32)
                zero = jnp.zeros((), jnp.int32)
                k = jax.lax.dynamic_update_slice(cached_key.value, k, (zero, index, zero, zero))
                v = jax.lax.dynamic_update_slice(cached_value.value, v, (zero, index, zero, zero))
                cached_key.value, cached_value.value = k, v

        logits_dtype = jnp.float32 if self.float32_logits else self.dtype
        logits = jnp.einsum("bqhk,bshk->bhqs", q.astype(logits_dtype), k.astype(logits_dtype))
        if bias is not None:
            logits = logits + bias.astype(logits_dtype)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.asarray(_NEG_INF, logits_dtype))
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        weights = part.with_logical_constraint(weights, (part.BATCH, part.HEADS, part.LENGTH, None))
        if self.dropout_rate > 0.0 and not deterministic:
            weights = nn.Dropout(rate=self.dropout_rate)(weights, deterministic=False)
        y = jnp.einsum("bhqs,bshk->bqhk", weights, v.astype(self.dtype))
        out_kernel = self.param(
            "out",
            nn.with_logical_partitioning(out_init, (part.HEADS, part.KV, part.EMBED)),
            (self.num_heads, self.head_dim, inputs_q.shape[-1]),
            self.param_dtype,
        )
        out = jnp.einsum("bqhk,hkd->bqd", y, out_kernel.astype(self.dtype))
        out = part.with_logical_constraint(out, (part.BATCH, part.LENGTH, part.EMBED))
        return names.checkpoint_name(out, names.ATTENTION_OUT)


def _scaled(init, scale, *args):
    return init(*args) * scale


def attention_mask(q_valid: Array, k_valid: Array, q_segments: Array | None = None,
                   k_segments: Array | None = None) -> Array:
    """bool [B, 1, Q, K]: both tokens real and (when packed) in the same segment."""
    mask = q_valid[:, None, :, None] & k_valid[:, None, None, :]
    if q_segments is not None and k_segments is not None:
        mask = mask & (q_segments[:, None, :, None] == k_segments[:, None, None, :])
    return mask


def causal_mask(length: int) -> Array:
    """bool [1, 1, L, L], key position <= query position."""
    idx = jnp.arange(length)
    return (idx[None, :] <= idx[:, None])[None, None]


def decoder_self_mask(decoder_target_tokens: Array, decoder_segment_ids: Array | None = None,
                      decoder_causal_attention: Array | None = None) -> Array:
    """Causal mask over real target tokens (same segment when packed). With
    ``decoder_causal_attention`` (prefix LM: 1 on the input prefix) the prefix attends
    bidirectionally within itself."""
    valid = decoder_target_tokens > 0
    mask = causal_mask(decoder_target_tokens.shape[1])
    if decoder_causal_attention is not None:
        prefix = decoder_causal_attention > 0
        mask = mask | (prefix[:, None, :, None] & prefix[:, None, None, :])
    return mask & attention_mask(valid, valid, decoder_segment_ids, decoder_segment_ids)
