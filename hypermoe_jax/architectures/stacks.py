"""Encoder, decoder and decoder-only stacks, with layers under ``nn.scan``.

Shapes: B batch, L length, d model dim, P periods (scan length).

A stack is: the relative position bias (one table per stack, computed once per call:
bidirectional in the encoder, causal in the decoder), the HyperMoE generator (when the MoE layers
have HyperExperts), the layers -- P periods (``blocks.Period``, ``config.StackLayout``), scanned
or unrolled, then the layout's tail if it has one -- and a final RMSNorm with dropout. Parameter
tree of the layers:

    scanned:   layers/{dense_0, ..., dense_{s-2}, sparse}/...   every leaf with a leading [P] axis
    unrolled:  layers_{p}/{dense_0, ..., sparse}/...            p = 0 .. P-1, no layer axis
    tail:      tail/{dense_0, sparse, ...}/...                  (``hf`` placement) no layer axis

``stack_layers`` / ``unstack_layers`` convert one into the other (any collection).

HyperMoE: one ``HyperExpertGenerator`` per stack lives OUTSIDE the scan (its shared hypernetwork
is one set of weights for all MoE layers); it produces a pytree with a leading axis of MoE layers,
which the scan consumes as its per-period input (``xs``). Everything else the periods need (masks,
the relative position bias, encoder outputs, the active k) is broadcast (``in_axes=nn.broadcast``).
Per-layer variables -- ``params`` and the non-trainable ``frozen`` collection of HyperRouter /
SMoE-Dropout -- are stacked by the scan.

Aux losses: every MoE layer returns a ``MoeAux``; the scan returns them as its outputs (stacked over
periods), so they survive ``nn.scan`` and remat (nothing is sown).

Decoding: ``decode=True`` uses a key/value cache in the ``cache`` collection. The first call (with
the full target length) creates it; later calls take one token ``[B, 1]`` each. The cache of the
scanned layers is stacked on axis 1 (``[B, P, L, H, D]``), so every cache leaf with a batch has it
on axis 0 (what ``decoding`` expects); the decode position is one scalar per stack. In a decode
step each MoE layer routes the batch of single tokens, one group per token shard of the mesh.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures.attention import RelativePositionBias, causal_mask
from hypermoe_jax.architectures.blocks import Period, RmsNorm
from hypermoe_jax.architectures.config import (
    CACHE,
    DROPOUT,
    FROZEN,
    INTERMEDIATES,
    JITTER,
    PARAMS,
    TransformerConfig,
    parse_remat_policy,
    stack_layout,
)
from hypermoe_jax.layers.hyper_experts import HyperExpertGenerator
from hypermoe_jax.layers.moe_layer import MoeAux

Array = jax.Array
# Collections whose per-layer variables the scan stacks on axis 0 (the cache: on axis 1).
_STACKED_COLLECTIONS = (PARAMS, FROZEN, INTERMEDIATES)


def remat_policy(spec: str):
    """The ``jax.checkpoint`` policy of a ``TransformerConfig.remat_policy`` other than ``none``
    (``config.parse_remat_policy``): None (save nothing) for ``full``; otherwise the union of the
    terms' policies."""
    cp = jax.checkpoint_policies
    policies = []
    for kind, names in parse_remat_policy(spec):
        if kind == "none":
            raise ValueError("remat_policy 'none' means no remat; there is no policy to build.")
        if kind == "full":
            return None
        policies.append({
            "dots": lambda: cp.checkpoint_dots,
            "dots_no_batch": lambda: cp.checkpoint_dots_with_no_batch_dims,
            "save": lambda names=names: cp.save_only_these_names(*names),
            "recompute": lambda names=names: cp.save_any_names_but_these(*names),
        }[kind]())
    policy = policies[0]
    for other in policies[1:]:
        policy = cp.save_from_both_policies(policy, other)
    return policy


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

    def _hyper_inputs(self, num_moe_layers: int) -> Any:
        """The HyperExperts of every MoE layer of the stack (leading axis: MoE layers), or
        None."""
        moe = self.config.moe
        if not num_moe_layers or not moe.uses_generator:
            return None
        return HyperExpertGenerator(
            num_layers=num_moe_layers,
            num_experts=moe.num_experts,
            num_selected=moe.num_selected,
            d_model=self.config.emb_dim,
            config=moe.hyper_experts,
            param_dtype=self.config.param_dtype,
            name="hyper_generator",
        )()

    def _position_bias(self, relpos, batch, length, positions, self_mask, padding_mask, decode):
        """``(bias, self_mask, padding_mask, decode_index)`` for a forward pass, the cache
        creation pass (``decode``, first call) or a decode step (``decode``, cache exists: one
        new token at slot ``position``; it sees the cache slots <= position)."""
        if not decode:
            q_pos = jnp.arange(length)[None] if positions is None else positions
            return relpos(q_pos, q_pos), self_mask, padding_mask, None
        if not self.causal:
            raise ValueError("decode=True is for causal (decoder) stacks.")
        step = self.has_variable(CACHE, "position")
        position = self.variable(CACHE, "position", lambda: jnp.zeros((), jnp.int32))
        # Position of every cache slot, [B, max_length] (batch-major like all cache leaves).
        slots = self.variable(
            CACHE, "slot_positions",
            lambda: jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
        )
        if not step:
            pos = jnp.arange(length)[None]
            return relpos(pos, pos), (causal_mask(length) if self_mask is None else self_mask), \
                padding_mask, None
        decode_index = position.value
        k_pos = slots.value
        q_pos = jnp.broadcast_to(decode_index, (k_pos.shape[0], 1))
        position.value = decode_index + 1
        return (relpos(q_pos, k_pos), (k_pos <= decode_index)[:, None, None, :], None,
                decode_index)

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
    ) -> tuple[Array, MoeAux | None]:
        """x: [B, L, d] embedded tokens; self_mask: bool [B, 1, L, L]; positions: [B, L] (packed
        inputs) or None (0..L-1); encoded: [B, K, d] with cross_mask bool [B, 1, L, K];
        padding_mask: [B, L] real tokens for routing."""
        cfg = self.config
        batch, length = x.shape[:2]
        layout = stack_layout(self.num_layers, self.sparse_step, cfg.sparse_placement)

        relpos = RelativePositionBias(
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            num_heads=cfg.num_heads,
            bidirectional=not self.causal,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            name="relpos_bias",
        )
        bias, self_mask, padding_mask, decode_index = self._position_bias(
            relpos, batch, length, positions, self_mask, padding_mask, decode)
        hyper_inputs = self._hyper_inputs(layout.num_moe_layers)
        # The periods take the first MoE layers' HyperExperts, a sparse tail block the last one.
        in_periods = layout.moe_layers_in_periods
        period_hyper = tail_hyper = None
        if hyper_inputs is not None:
            if in_periods:
                period_hyper = jax.tree.map(lambda a: a[:in_periods], hyper_inputs)
            if any(layout.tail):
                tail_hyper = jax.tree.map(lambda a: a[in_periods], hyper_inputs)

        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
            x, deterministic=deterministic
        )
        x = x.astype(cfg.dtype)
        period_cls = Period
        if cfg.remat_policy != "none":
            period_cls = nn.remat(
                Period, policy=remat_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers
            )
        period_kwargs = dict(
            config=cfg, cross_attention=self.cross_attention, encoder=not self.causal,
            deterministic=deterministic, decode=decode,
        )
        args = (self_mask, bias, encoded, cross_mask, padding_mask, active_k, decode_index)
        auxes = []  # MoeAux of the MoE layers, stacked on a leading axis
        if layout.periods and cfg.scan_layers:
            scanned = nn.scan(
                period_cls,
                variable_axes={**{c: 0 for c in _STACKED_COLLECTIONS}, CACHE: 1},
                split_rngs={"params": True, DROPOUT: True, JITTER: True},
                in_axes=(0,) + (nn.broadcast,) * len(args),
                length=layout.periods,
                metadata_params={nn.PARTITION_NAME: part.LAYERS},
            )
            x, aux = scanned(pattern=layout.pattern, **period_kwargs, name="layers")(
                x, period_hyper, *args)
            auxes.append(aux)
        elif layout.periods:
            per_period = []
            for p in range(layout.periods):
                layer_inputs = jax.tree.map(lambda a, p=p: a[p], period_hyper)
                x, a = period_cls(pattern=layout.pattern, **period_kwargs, name=f"layers_{p}")(
                    x, layer_inputs, *args)
                per_period.append(a)
            if in_periods:
                auxes.append(jax.tree.map(lambda *a: jnp.stack(a), *per_period))
        if layout.tail:
            x, a = period_cls(pattern=layout.tail, **period_kwargs, name="tail")(
                x, tail_hyper, *args)
            if a is not None:
                auxes.append(jax.tree.map(lambda v: v[None], a))
        auxes = [a for a in auxes if a is not None]
        aux = None
        if auxes:
            aux = auxes[0] if len(auxes) == 1 else jax.tree.map(
                lambda *a: jnp.concatenate(a), *auxes)
        x = RmsNorm(cfg.layer_norm_epsilon, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
        x = nn.Dropout(rate=cfg.dropout_rate, broadcast_dims=cfg.dropout_broadcast_dims)(
            x, deterministic=deterministic
        )
        return part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED)), aux


# --------------------------------------------------------------------------------------------
# Scanned <-> unrolled variable trees
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
