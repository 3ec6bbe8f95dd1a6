"""Transformer blocks: RMSNorm, the dense MLP, one pre-norm block, and the scanned period.

A ``Block`` is self-attention, (cross-attention) and a dense ``MlpBlock`` or a sparse MLP
(``layers.variants.SparseMlp`` with the stack's ``MoeConfig``). A ``Period`` is the blocks of one
period of a ``config.StackLayout`` (e.g. ``sparse_step - 1`` dense blocks and one sparse block):
the unit ``nn.scan`` repeats.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures.attention import MultiHeadAttention
from hypermoe_jax.architectures.config import TransformerConfig, default_kernel_init
from hypermoe_jax.layers import checkpoint_names as names
from hypermoe_jax.layers.experts import activation_fn
from hypermoe_jax.layers.variants import MoeConfig, SparseMlp

Array = jax.Array


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
        act = activation_fn(self.activation)
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
        h = names.checkpoint_name(h, names.MLP_HIDDEN)
        if self.dropout_rate > 0.0 and not deterministic:
            h = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(-2,))(h, deterministic=False)
        y = dense("wo", (self.mlp_dim, d), (part.MLP, part.EMBED), h)
        y = part.with_logical_constraint(y, (part.BATCH, part.LENGTH, part.EMBED))
        return names.checkpoint_name(y, names.MLP_OUT)


def context_mesh() -> Any:
    """The (abstract) mesh of the enclosing ``jax.set_mesh`` context (``partitioning.axis_rules
    (mesh)``), or None: MoE layers run expert-parallel on it."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or part.EXPERT not in mesh.axis_names:
        return None
    return mesh


def block_moe_config(moe: MoeConfig, *, encoder: bool, decode_step: bool, batch: int,
                     mesh: Any) -> MoeConfig:
    """The stack's ``MoeConfig`` as one block uses it: batch prioritized routing only in encoders
    (it looks at the whole group). In a decode step (one token per sequence) a group is the batch
    of single tokens, one per token shard of the mesh, and every expert has a slot for every token
    of the group: decoding drops no token, so a sequence decodes the same alone or in any batch."""
    if moe.router.batch_prioritized and not encoder:
        moe = dataclasses.replace(moe, router=dataclasses.replace(moe.router,
                                                                  batch_prioritized=False))
    if decode_step:
        shards = part.mesh_axis_size(mesh, part.TOKEN_SHARDS)
        group_size = batch // shards if batch % shards == 0 else batch
        dispatch = dataclasses.replace(moe.dispatch, group_size=group_size, expert_capacity=None,
                                       min_capacity=max(moe.dispatch.min_capacity, group_size))
        moe = dataclasses.replace(moe, dispatch=dispatch)
    return moe


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
            mesh = context_mesh()
            moe = block_moe_config(cfg.moe, encoder=self.encoder, decode_step=decode_step,
                                   batch=x.shape[0], mesh=mesh)
            h, aux = SparseMlp(moe, mesh=mesh, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               name="mlp")(
                h, deterministic=det, padding_mask=padding_mask, active_k=active_k,
                hyper_inputs=hyper_inputs)
        else:
            h = MlpBlock(
                mlp_dim=cfg.mlp_dim, activation=cfg.activation, dropout_rate=cfg.dropout_rate,
                dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="mlp",
            )(h, deterministic=det)
        x = x + dropout(h)
        x = part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED))
        return x, aux


class Period(nn.Module):
    """Blocks in the order of ``pattern`` (True = sparse): the unit that ``nn.scan`` repeats
    (``config.StackLayout``), also used for a stack's unscanned tail. Dense blocks are named
    ``dense_0, dense_1, ...`` in order, the (at most one) sparse block ``sparse``. Returns
    ``(x, MoeAux | None)``."""

    config: TransformerConfig
    pattern: tuple[bool, ...]
    cross_attention: bool = False
    encoder: bool = False
    deterministic: bool = True
    decode: bool = False

    @nn.compact
    def __call__(self, x, hyper_inputs, self_mask, self_bias, encoded, cross_mask, padding_mask,
                 active_k, decode_index):
        if sum(self.pattern) > 1:
            raise ValueError(f"A period holds at most one sparse block, got {self.pattern}.")
        block = functools.partial(
            Block, config=self.config, cross_attention=self.cross_attention, encoder=self.encoder,
            deterministic=self.deterministic, decode=self.decode,
        )
        args = (self_mask, self_bias, encoded, cross_mask, padding_mask, active_k, decode_index)
        aux, dense = None, 0
        for sparse in self.pattern:
            if sparse:
                x, aux = block(sparse=True, name="sparse")(x, hyper_inputs, *args)
            else:
                x, _ = block(sparse=False, name=f"dense_{dense}")(x, None, *args)
                dense += 1
        return x, aux
