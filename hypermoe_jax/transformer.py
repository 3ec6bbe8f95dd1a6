"""T5 v1.1 / Switch encoder-decoder and decoder-only stacks, with layers under ``nn.scan``.

Shapes: B batch, L (Q, K) length, d model dim, H heads, D head dim, f MLP hidden dim,
P periods (scan length), E experts.

Architecture (T5 v1.1): token embeddings (shared by encoder and decoder), RMSNorm pre-norm blocks
without biases, relative position buckets (one bias table per stack, computed once per call:
bidirectional in the encoder, causal in the decoder), gated-GELU MLPs, dropout after the embedding,
on attention probabilities, on the MLP hidden layer and on every residual branch. Logits come from
an untied ``[d, vocab]`` projection (T5 v1.1) or from the embedding (tied; then scaled by d^-0.5).

Sparse layers: every ``sparse_step``-th block of a stack uses a sparse MLP (``hyper.SparseMlp``,
any variant of ``hyper.VARIANTS``) instead of the dense one; on a mesh (``MoeConfig.mesh`` or the
mesh of the enclosing ``partitioning.axis_rules(mesh)``) its experts run expert-parallel. The
layers of a stack
are grouped into P periods of ``sparse_step`` blocks -- ``sparse_step - 1`` dense blocks and one
sparse block -- and the period is the unit that ``nn.scan`` repeats (``sparse_step`` 0 / None: a
period is one dense block). Parameter tree of a stack:

    scanned:   layers/{dense_0, ..., dense_{s-2}, sparse}/...   every leaf with a leading [P] axis
    unrolled:  layers_{p}/{dense_0, ..., sparse}/...            p = 0 .. P-1, no layer axis

``stack_layers`` / ``unstack_layers`` convert one into the other (any collection).

HyperMoE: one ``hyper.HyperExpertGenerator`` per stack lives OUTSIDE the scan (its shared
hypernetwork is one set of weights for all MoE layers); it produces a pytree with a leading axis of
MoE layers, which the scan consumes as its per-period input (``xs``). Everything else the periods
need (masks, the relative position bias, encoder outputs, the active k) is broadcast
(``in_axes=nn.broadcast``). Per-layer parameters -- ``params`` and the non-trainable ``frozen``
collection of HyperRouter / SMoE-Dropout -- are stacked by the scan.

Aux losses: every MoE layer returns a ``moe_layer.MoeAux``; the scan returns them as its outputs
(stacked over periods), so they survive ``nn.scan`` and remat (nothing is sown).

Decoding: ``decode=True`` uses a key/value cache in the ``cache`` collection. The first call (with
the full target length) creates it; later calls take one token ``[B, 1]`` each. The cache of the
scanned layers is stacked on axis 1 (``[B, P, L, H, D]``), so every cache leaf with a batch has it
on axis 0 (what ``decoding`` expects); the decode position is one scalar per stack. In a decode
step each MoE layer routes the batch of single tokens, one group per token shard of the mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from hypermoe_jax import hyper, moe_layer, routing
from hypermoe_jax import partitioning as part

Array = jax.Array
RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
CACHE = "cache"
# Collections whose per-layer variables the scan stacks on axis 0.
_STACKED_COLLECTIONS = ("params", routing.FROZEN, "intermediates")
_NEG_INF = -1e10

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Options of the sparse MLP layers of a model (all MoE layers of both stacks share them).

    Attributes:
      variant: one of ``hyper.VARIANTS`` (switch, hypermoe, hyperrouter, smoe_dropout, moe_share).
      num_experts: E.
      num_selected: K, the (maximum) number of experts per token.
      expert_hidden_dim: f of each expert; None = the dense ``mlp_dim``.
      train_capacity_factor / eval_capacity_factor / min_capacity: see ``routing.expert_capacity``.
      group_size: tokens per routing group (None: one group per sequence). While decoding one
        token at a time, a group is the batch of single tokens (split over the data*expert
        shards of the mesh).
      jitter_noise: multiplicative router-input jitter in training (rng stream ``jitter``).
      router_use_bias: trainable router bias (linear routers).
      gate_normalization: None = the variant's default (see ``hyper``).
      batch_prioritized_routing: BPR, applied in the encoder only (it looks at the whole group).
      dropped_token_behavior: ``zero`` or ``scale_input`` (see ``moe_layer.MoeLayer``).
      expert_dropout_rate: dropout on the experts' hidden activations.
      hyper_options: extra keyword arguments for ``hyper.SparseMlp`` and
        ``hyper.HyperExpertGenerator`` (HyperMoE / HyperRouter / MoE-Share sizes), as
        ``((name, value), ...)`` so the config stays hashable.
      mesh: (data, expert, model) mesh for expert parallelism; None = the mesh of the enclosing
        ``partitioning.axis_rules(mesh)`` context, if any.
    """

    variant: str = "switch"
    num_experts: int = 8
    num_selected: int = 1
    expert_hidden_dim: int | None = None
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: int | None = None
    jitter_noise: float = 0.0
    router_use_bias: bool = False
    gate_normalization: str | None = None
    batch_prioritized_routing: bool = False
    dropped_token_behavior: str = "zero"
    expert_dropout_rate: float = 0.0
    hyper_options: tuple[tuple[str, Any], ...] = ()
    mesh: Mesh | None = None

    def __post_init__(self):
        if self.variant not in hyper.VARIANTS:
            raise ValueError(
                f"Unknown MoE variant {self.variant!r}; choose one of {sorted(hyper.VARIANTS)}."
            )
        if isinstance(self.hyper_options, Mapping):
            object.__setattr__(self, "hyper_options", tuple(sorted(self.hyper_options.items())))

    @property
    def uses_generator(self) -> bool:
        """Whether the variant needs a per-stack ``hyper.HyperExpertGenerator``."""
        return hyper.VARIANTS[self.variant][1] == "hypermoe"


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a T5-style transformer (encoder-decoder or decoder-only).

    ``encoder_sparse_step`` / ``decoder_sparse_step``: every s-th block of the stack is sparse
    (blocks s-1, 2s-1, ...); 0 or None = all dense; the number of layers must be a multiple of s.
    ``remat_policy`` (per scanned period): ``none`` | ``full`` (save nothing, recompute the
    period in the backward pass) | ``dots`` (save matmul outputs) | ``dots_no_batch`` (save
    matmuls without batch dimensions, i.e. weight-stationary ones).
    """

    vocab_size: int
    emb_dim: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    activation: str = "gated-gelu"
    dropout_rate: float = 0.1
    dropout_broadcast_dims: tuple[int, ...] = (-2,)
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    encoder_sparse_step: int | None = None
    decoder_sparse_step: int | None = None
    moe: MoeConfig | None = None
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"
    float32_attention_logits: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"Unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}."
            )
        if _is_sparse(self.encoder_sparse_step) or _is_sparse(self.decoder_sparse_step):
            if self.moe is None:
                raise ValueError(
                    "A sparse_step is set but TransformerConfig.moe is None; pass a MoeConfig "
                    "(or set encoder_sparse_step / decoder_sparse_step to 0 for a dense model)."
                )


def _is_sparse(step: int | None) -> bool:
    return bool(step) and step > 0


def num_periods(num_layers: int, sparse_step: int | None) -> int:
    """Scan length P of a stack (= its number of MoE layers when it is sparse)."""
    if not _is_sparse(sparse_step):
        return num_layers
    if num_layers % sparse_step:
        raise ValueError(
            f"{num_layers} layers cannot be split into periods of sparse_step={sparse_step} "
            f"(sparse_step-1 dense blocks + 1 sparse block); choose a sparse_step that divides "
            f"the number of layers."
        )
    return num_layers // sparse_step


def sparse_layer_indices(num_layers: int, sparse_step: int | None) -> list[int]:
    """Block indices (0-based) of the MoE layers of a stack, in order."""
    if not _is_sparse(sparse_step):
        return []
    return [p * sparse_step + sparse_step - 1 for p in range(num_periods(num_layers, sparse_step))]


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _activation_fn(name: str):
    if name in ("relu",):
        return jax.nn.relu
    if name in ("gelu", "gated-gelu"):
        return lambda v: jax.nn.gelu(v, approximate=True)
    if name in ("silu", "gated-silu"):
        return jax.nn.silu
    raise ValueError(f"Unknown activation {name!r}; use relu, gelu, gated-gelu or gated-silu.")


class RmsNorm(nn.Module):
    """T5 layer norm: ``x / rms(x) * scale`` (no centering, no bias), computed in float32."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (part.EMBED,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embeddings ``[vocab, d]``; ``attend`` gives tied logits (unscaled)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: nn.initializers.Initializer = default_embed_init

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, (part.VOCAB, part.EMBED)),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Token ids must be integers, got {ids.dtype}.")
        x = jnp.take(self.embedding.astype(self.dtype), ids, axis=0)
        return part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED))

    def attend(self, query: Array) -> Array:
        """``[..., d] -> [..., vocab]`` with the embedding matrix."""
        embedding = self.embedding.astype(self.dtype)
        return jnp.einsum("...d,vd->...v", query.astype(self.dtype), embedding)


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
        return part.with_logical_constraint(y, (part.BATCH, part.LENGTH, part.HEADS, part.KV))

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
        return part.with_logical_constraint(out, (part.BATCH, part.LENGTH, part.EMBED))


def _scaled(init, scale, *args):
    return init(*args) * scale


class MlpBlock(nn.Module):
    """Dense T5 MLP: ``wo(act(wi_0 x) * wi_1 x)`` (gated) or ``wo(act(wi x))``, no biases."""

    mlp_dim: int
    activation: str = "gated-gelu"
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = default_kernel_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        act = _activation_fn(self.activation)
        d = x.shape[-1]
        x = x.astype(self.dtype)

        def dense(name, shape, axes, inp):
            kernel = self.param(
                name, nn.with_logical_partitioning(self.kernel_init, axes), shape, self.param_dtype
            )
            return jnp.einsum("...i,io->...o", inp, kernel.astype(self.dtype))

        if self.activation.startswith("gated-"):
            h = act(dense("wi_0", (d, self.mlp_dim), (part.EMBED, part.MLP), x))
            h = h * dense("wi_1", (d, self.mlp_dim), (part.EMBED, part.MLP), x)
        else:
            h = act(dense("wi", (d, self.mlp_dim), (part.EMBED, part.MLP), x))
        h = part.with_logical_constraint(h, (part.BATCH, part.LENGTH, part.MLP))
        if self.dropout_rate > 0.0 and not deterministic:
            h = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=False)
        y = dense("wo", (self.mlp_dim, d), (part.MLP, part.EMBED), h)
        return part.with_logical_constraint(y, (part.BATCH, part.LENGTH, part.EMBED))


def context_mesh() -> Any:
    """The (abstract) mesh of the enclosing ``jax.set_mesh`` context, or None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or part.EXPERT not in mesh.axis_names:
        return None
    return mesh


def _sparse_mlp(moe: MoeConfig, *, mlp_dim: int, activation: str, encoder: bool,
                decode_step: bool, batch: int, dtype: Any, param_dtype: Any,
                name: str) -> nn.Module:
    """The sparse MLP of one MoE layer."""
    mesh = moe.mesh if moe.mesh is not None else context_mesh()
    group_size = moe.group_size
    if decode_step:
        # One token per sequence: a group is the batch of single tokens, one per token shard.
        shards = part.mesh_axis_size(mesh, part.TOKEN_SHARDS)
        group_size = batch // shards if batch % shards == 0 else batch
    kwargs = dict(
        num_experts=moe.num_experts,
        expert_hidden_dim=moe.expert_hidden_dim or mlp_dim,
        num_selected=moe.num_selected,
        activation=activation,
        train_capacity_factor=moe.train_capacity_factor,
        eval_capacity_factor=moe.eval_capacity_factor,
        min_capacity=moe.min_capacity,
        group_size=group_size,
        jitter_noise=moe.jitter_noise,
        router_use_bias=moe.router_use_bias,
        batch_prioritized_routing=moe.batch_prioritized_routing and encoder,
        dropped_token_behavior=moe.dropped_token_behavior,
        expert_dropout_rate=moe.expert_dropout_rate,
        mesh=mesh,
    )
    if moe.gate_normalization is not None:
        kwargs["gate_normalization"] = moe.gate_normalization
    kwargs.update(dtype=dtype, param_dtype=param_dtype)
    layer_options, _ = _split_hyper_options(moe)
    return hyper.SparseMlp(variant=moe.variant, **kwargs, **layer_options, name=name)


def _module_fields(cls) -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(cls)) - {"parent", "name"}


def _split_hyper_options(moe: MoeConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``MoeConfig.hyper_options`` -> (``SparseMlp`` kwargs, ``HyperExpertGenerator`` kwargs)."""
    layer_fields = _module_fields(hyper.SparseMlp)
    gen_fields = _module_fields(hyper.HyperExpertGenerator) - {
        "num_layers", "num_experts", "num_selected", "d_model"
    }
    layer, gen = {}, {}
    for key, value in moe.hyper_options:
        if key in layer_fields:
            layer[key] = value
        elif key in gen_fields:
            gen[key] = value
        else:
            raise ValueError(
                f"Unknown MoeConfig.hyper_options key {key!r}; SparseMlp takes "
                f"{sorted(layer_fields)} and HyperExpertGenerator takes {sorted(gen_fields)}."
            )
    return layer, gen


# --------------------------------------------------------------------------------------------
# Blocks, periods, stacks
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """One pre-norm transformer block: self-attention, (cross-attention), dense or sparse MLP."""

    config: TransformerConfig
    sparse: bool = False
    cross_attention: bool = False
    encoder: bool = False  # enables encoder-only MoE options (batch prioritized routing)
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, hyper_inputs, self_mask, self_bias, encoded, cross_mask, padding_mask,
                 active_k, decode_index):
        cfg = self.config
        det = self.deterministic

        def dropout(h):
            return nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
                h, deterministic=det
            )

        def attention(name):
            return MultiHeadAttention(
                num_heads=cfg.num_heads, head_dim=cfg.head_dim, dropout_rate=cfg.dropout_rate,
                float32_logits=cfg.float32_attention_logits, dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name=name,
            )

        def norm(name):
            return RmsNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name=name)

        x = part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED))
        h = norm("self_attention_norm")(x)
        h = attention("self_attention")(
            h, h, mask=self_mask, bias=self_bias, deterministic=det, decode=self.decode,
            decode_index=decode_index,
        )
        x = x + dropout(h)
        if self.cross_attention:
            h = norm("cross_attention_norm")(x)
            h = attention("cross_attention")(h, encoded, mask=cross_mask, deterministic=det)
            x = x + dropout(h)
        h = norm("mlp_norm")(x)
        aux = None
        if self.sparse:
            # A decode step (one token per sequence) is the only case with a decode_index.
            decode_step = self.decode and decode_index is not None
            mlp = _sparse_mlp(
                cfg.moe, mlp_dim=cfg.mlp_dim, activation=cfg.activation, encoder=self.encoder,
                decode_step=decode_step, batch=x.shape[0], dtype=cfg.dtype,
                param_dtype=cfg.param_dtype, name="mlp",
            )
            call_kwargs = dict(deterministic=det, padding_mask=padding_mask, active_k=active_k)
            if hyper_inputs is not None:
                call_kwargs["hyper_inputs"] = hyper_inputs
            h, aux = mlp(h, **call_kwargs)
        else:
            h = MlpBlock(
                mlp_dim=cfg.mlp_dim, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp",
            )(h, deterministic=det)
        x = x + dropout(h)
        x = part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED))
        return x, aux


class Period(nn.Module):
    """``sparse_step - 1`` dense blocks then one sparse block (or one dense block): the unit that
    ``nn.scan`` repeats. Returns ``(x, MoeAux | None)``."""

    config: TransformerConfig
    sparse_step: int | None
    cross_attention: bool = False
    encoder: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, hyper_inputs, self_mask, self_bias, encoded, cross_mask, padding_mask,
                 active_k, decode_index):
        block = functools.partial(
            Block, config=self.config, cross_attention=self.cross_attention, encoder=self.encoder,
            deterministic=self.deterministic, decode=self.decode,
        )
        args = (self_mask, self_bias, encoded, cross_mask, padding_mask, active_k, decode_index)
        if not _is_sparse(self.sparse_step):
            x, _ = block(sparse=False, name="dense_0")(x, None, *args)
            return x, None
        for i in range(self.sparse_step - 1):
            x, _ = block(sparse=False, name=f"dense_{i}")(x, None, *args)
        return block(sparse=True, name="sparse")(x, hyper_inputs, *args)


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class TransformerStack(nn.Module):
    """Encoder, decoder or decoder-only stack: relative position bias, (HyperMoE generator),
    the layers (scanned or unrolled), final RMSNorm and dropout.

    Returns ``(y <[B, L, d]>, MoeAux stacked over the MoE layers [P, ...] | None)``.
    """

    config: TransformerConfig
    num_layers: int
    sparse_step: int | None
    causal: bool
    cross_attention: bool = False

    def _make_generator(self, num_moe_layers: int) -> Any:
        moe = self.config.moe
        return hyper.HyperExpertGenerator(
            num_layers=num_moe_layers,
            num_experts=moe.num_experts,
            num_selected=moe.num_selected,
            d_model=self.config.emb_dim,
            param_dtype=self.config.param_dtype,
            **_split_hyper_options(moe)[1],
            name="hyper_generator",
        )

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        self_mask: Array | None,
        positions: Array | None = None,
        encoded: Array | None = None,
        cross_mask: Array | None = None,
        padding_mask: Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        active_k: Array | int | None = None,
    ) -> tuple[Array, moe_layer.MoeAux | None]:
        """x: [B, L, d] embedded tokens; self_mask: bool [B, 1, L, L]; positions: [B, L] (packed
        inputs) or None (0..L-1); encoded: [B, K, d] with cross_mask bool [B, 1, L, K];
        padding_mask: [B, L] real tokens for routing."""
        cfg = self.config
        batch, length = x.shape[:2]
        sparse = _is_sparse(self.sparse_step)
        periods = num_periods(self.num_layers, self.sparse_step)

        relpos = RelativePositionBias(
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads,
            bidirectional=not self.causal,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="relpos_bias",
        )
        decode_index = None
        if decode:
            if not self.causal:
                raise ValueError("decode=True is for causal (decoder) stacks.")
            step = self.has_variable(CACHE, "position")
            position = self.variable(CACHE, "position", lambda: jnp.zeros((), jnp.int32))
            # Position of every cache slot, [B, max_length] (batch-major like all cache leaves).
            slots = self.variable(
                CACHE, "slot_positions",
                lambda: jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
            )
            if step:
                # One new token at slot `position`; it sees the cache slots <= position.
                decode_index = position.value
                k_pos = slots.value
                q_pos = jnp.broadcast_to(decode_index, (k_pos.shape[0], 1))
                bias = relpos(q_pos, k_pos)
                self_mask = (k_pos <= decode_index)[:, None, None, :]
                position.value = decode_index + 1
                padding_mask = None
            else:
                # Cache creation: a full-length (causal) forward pass.
                pos = jnp.arange(length)[None]
                bias = relpos(pos, pos)
                if self_mask is None:
                    self_mask = causal_mask(length)
        else:
            q_pos = jnp.arange(length)[None] if positions is None else positions
            bias = relpos(q_pos, q_pos)

        hyper_inputs = None
        if sparse and cfg.moe.uses_generator:
            hyper_inputs = self._make_generator(periods)()

        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
            x, deterministic=deterministic
        )
        x = x.astype(cfg.dtype)
        period_cls = Period
        if cfg.remat_policy != "none":
            period_cls = nn.remat(
                Period, policy=_remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers
            )
        period_kwargs = dict(
            config=cfg, sparse_step=self.sparse_step, cross_attention=self.cross_attention,
            encoder=not self.causal, deterministic=deterministic, decode=decode,
        )
        args = (self_mask, bias, encoded, cross_mask, padding_mask, active_k, decode_index)
        if cfg.scan_layers:
            scanned = nn.scan(
                period_cls,
                variable_axes={**{c: 0 for c in _STACKED_COLLECTIONS}, CACHE: 1},
                split_rngs={"params": True, "dropout": True, routing.JITTER: True},
                in_axes=(0,) + (nn.broadcast,) * len(args),
                length=periods,
                metadata_params={nn.PARTITION_NAME: part.LAYERS},
            )
            x, aux = scanned(**period_kwargs, name="layers")(x, hyper_inputs, *args)
        else:
            auxes = []
            for p in range(periods):
                layer_inputs = jax.tree.map(lambda a, p=p: a[p], hyper_inputs)
                x, a = period_cls(**period_kwargs, name=f"layers_{p}")(x, layer_inputs, *args)
                auxes.append(a)
            aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if sparse else None
        x = RmsNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
            x, deterministic=deterministic
        )
        return part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED)), aux


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _logits_head(cfg: TransformerConfig, embedder: Embed, y: Array, dense: Any) -> Array:
    if cfg.logits_via_embedding:
        logits = embedder.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], cfg.dtype))
    else:
        logits = jnp.einsum("bld,dv->blv", y.astype(cfg.dtype), dense.astype(cfg.dtype))
    logits = logits.astype(jnp.float32)
    return part.with_logical_constraint(logits, (part.BATCH, part.LENGTH, part.VOCAB))


class EncoderDecoder(nn.Module):
    """T5 v1.1 / Switch encoder-decoder.

    ``__call__`` returns ``(logits <float32>[B, L, vocab], {'encoder': MoeAux|None,
    'decoder': MoeAux|None})``. ``enable_dropout=False`` is eval mode (also: no jitter, eval
    capacity factor). ``active_k``: traced number of experts per token (SMoE-Dropout).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.param_dtype)
        self.encoder = TransformerStack(
            cfg, cfg.num_encoder_layers, cfg.encoder_sparse_step, causal=False
        )
        self.decoder = TransformerStack(
            cfg, cfg.num_decoder_layers, cfg.decoder_sparse_step, causal=True,
            cross_attention=True,
        )
        if not cfg.logits_via_embedding:
            self.logits_dense = self.param(
                "logits_dense",
                nn.with_logical_partitioning(default_kernel_init, (part.EMBED, part.VOCAB)),
                (cfg.emb_dim, cfg.vocab_size),
                cfg.param_dtype,
            )

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, *,
               enable_dropout: bool = True, active_k=None):
        valid = encoder_input_tokens > 0
        mask = attention_mask(valid, valid, encoder_segment_ids, encoder_segment_ids)
        x = self.token_embedder(encoder_input_tokens)
        return self.encoder(
            x, self_mask=mask, positions=encoder_positions, padding_mask=valid,
            deterministic=not enable_dropout, active_k=active_k,
        )

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
               enable_dropout: bool = True, decode: bool = False, active_k=None):
        enc_valid = encoder_input_tokens > 0
        if decode:
            self_mask = None
            dec_valid = jnp.ones(decoder_input_tokens.shape, bool)
            cross_mask = attention_mask(dec_valid, enc_valid)
            padding_mask = None
        else:
            self_mask = decoder_self_mask(decoder_target_tokens, decoder_segment_ids)
            dec_valid = decoder_target_tokens > 0
            cross_mask = attention_mask(
                dec_valid, enc_valid, decoder_segment_ids, encoder_segment_ids
            )
            padding_mask = dec_valid if decoder_segment_ids is None else decoder_segment_ids > 0
        y = self.token_embedder(decoder_input_tokens)
        y, aux = self.decoder(
            y, self_mask=self_mask, positions=decoder_positions, encoded=encoded,
            cross_mask=cross_mask, padding_mask=padding_mask, deterministic=not enable_dropout,
            decode=decode, active_k=active_k,
        )
        dense = None if self.config.logits_via_embedding else self.logits_dense
        return _logits_head(self.config, self.token_embedder, y, dense), aux

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False,
                 active_k=None):
        encoded, enc_aux = self.encode(
            encoder_input_tokens, encoder_segment_ids, encoder_positions,
            enable_dropout=enable_dropout, active_k=active_k,
        )
        logits, dec_aux = self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
            encoder_segment_ids, decoder_segment_ids, decoder_positions,
            enable_dropout=enable_dropout, decode=decode, active_k=active_k,
        )
        return logits, {"encoder": enc_aux, "decoder": dec_aux}


class DecoderOnly(nn.Module):
    """Decoder-only LM (T5-style blocks without cross-attention); uses ``num_decoder_layers`` and
    ``decoder_sparse_step``. ``decoder_causal_attention`` (prefix LM) makes the prefix
    bidirectional. Returns ``(logits, {'decoder': MoeAux|None})``."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.param_dtype)
        self.decoder = TransformerStack(
            cfg, cfg.num_decoder_layers, cfg.decoder_sparse_step, causal=True
        )
        if not cfg.logits_via_embedding:
            self.logits_dense = self.param(
                "logits_dense",
                nn.with_logical_partitioning(default_kernel_init, (part.EMBED, part.VOCAB)),
                (cfg.emb_dim, cfg.vocab_size),
                cfg.param_dtype,
            )

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
                 decoder_positions=None, decoder_causal_attention=None, *,
                 enable_dropout: bool = True, decode: bool = False, active_k=None):
        if decode:
            self_mask, padding_mask = None, None
        else:
            targets = decoder_target_tokens
            if targets is None:
                targets = decoder_input_tokens
            self_mask = decoder_self_mask(targets, decoder_segment_ids, decoder_causal_attention)
            padding_mask = targets > 0 if decoder_segment_ids is None else decoder_segment_ids > 0
        y = self.token_embedder(decoder_input_tokens)
        y, aux = self.decoder(
            y, self_mask=self_mask, positions=decoder_positions, padding_mask=padding_mask,
            deterministic=not enable_dropout, decode=decode, active_k=active_k,
        )
        dense = None if self.config.logits_via_embedding else self.logits_dense
        return _logits_head(self.config, self.token_embedder, y, dense), {"decoder": aux}


# --------------------------------------------------------------------------------------------
# Scanned <-> unrolled parameter trees
# --------------------------------------------------------------------------------------------

_UNROLLED = re.compile(r"^layers_(\d+)$")


def _is_mapping(x) -> bool:
    return isinstance(x, Mapping)


def stack_layers(tree: Any, *, cache: bool = False) -> Any:
    """Unrolled -> scanned: ``layers_0 .. layers_{P-1}`` subtrees become one ``layers`` subtree
    with a leading [P] axis. Works on a variable dict or on one collection (unboxed arrays);
    other entries are kept. Leaves under a ``cache`` key -- or all, with ``cache=True`` -- are
    stacked on axis 1, as the scan stacks the decoding cache."""

    def rec(node, in_cache):
        if not _is_mapping(node):
            return node
        out, layers = {}, {}
        for k, v in node.items():
            m = _UNROLLED.match(str(k))
            if m:
                layers[int(m.group(1))] = rec(v, in_cache)
            else:
                out[k] = rec(v, in_cache or k == CACHE)
        if layers:
            axis = 1 if in_cache else 0
            ordered = [layers[i] for i in range(len(layers))]
            out["layers"] = jax.tree.map(lambda *a: jnp.stack(a, axis=axis), *ordered)
        return out

    return rec(tree, cache)


def unstack_layers(tree: Any, *, cache: bool = False) -> Any:
    """Scanned -> unrolled (inverse of ``stack_layers``)."""

    def rec(node, in_cache):
        if not _is_mapping(node):
            return node
        out = {}
        for k, v in node.items():
            if k == "layers" and _is_mapping(v):
                axis = 1 if in_cache else 0
                n = jax.tree.leaves(v)[0].shape[axis]
                for p in range(n):
                    out[f"layers_{p}"] = jax.tree.map(
                        lambda a, p=p, axis=axis: jnp.take(a, p, axis=axis), v
                    )
            else:
                out[k] = rec(v, in_cache or k == CACHE)
        return out

    return rec(tree, cache)
