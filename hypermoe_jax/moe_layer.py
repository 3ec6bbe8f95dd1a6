"""The sparse MoE layer: grouping, routing, dispatch, (expert-parallel) experts, combine.

Shapes: B batch, L length, d model dim, G groups, S tokens per group, E experts, C capacity,
K choices per token.

On a (data, expert, model) mesh the expert computation runs inside ``jax.shard_map``:
tokens arrive split over (data, expert) by group, are dispatched locally to ``[E, G_local, C, d]``,
exchanged with ``all_to_all`` over ``expert`` so that each device holds its own experts' tokens from
every group of its data row, run through the local experts, and sent back. Without a mesh the same
code runs on one device with the collectives skipped.

Dispatch and combine come in two forms with the same result (``MoeLayer.dispatch_impl``): one-hot
einsums with the ``[G, S, E, C]`` dispatch / combine tensors (GShard / Switch), or index gathers
from each choice's slot ``e * C + c`` (cheaper where einsums are not free, e.g. on CPU).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from hypermoe_jax import experts as experts_lib
from hypermoe_jax import partitioning as part
from hypermoe_jax import routing

Array = jax.Array
DroppedTokenBehavior = Literal["zero", "scale_input"]
DispatchImpl = Literal["einsum", "gather"]
DISPATCH_IMPLS = ("einsum", "gather")


@struct.dataclass
class MoeAux:
    """Per-layer side outputs of ``MoeLayer`` (returned, not sown, so they survive ``nn.scan``).

    Attributes:
      load_balance_loss: scalar.
      z_loss: scalar router z-loss.
      metrics: ``routing.routing_metrics`` (expert_load [E], dropped_fraction, router_entropy,
        router_confidence).
      expert_index: <int32>[B, L, K] top-k experts of each token before capacity (HyperMoE's
        unselected sets are derived from it; no gradient flows through it).
      kept: <bool>[B, L, K] whether each choice fitted into its expert's capacity.
    """

    load_balance_loss: Array
    z_loss: Array
    metrics: dict[str, Array]
    expert_index: Array
    kept: Array


def _dispatch_einsum(x: Array, dispatch: Array) -> Array:
    """[G_l, S, d] x <bool>[G_l, S, E, C] -> [E, G_l, C, d]: every expert's slots, local groups."""
    return jnp.einsum("gsec,gsd->egcd", dispatch.astype(x.dtype), x)


def _combine_einsum(y_e: Array, weights: Array) -> Array:
    """[E, G_l, C, d] x [G_l, S, E, C] -> [G_l, S, d]."""
    return jnp.einsum("gsec,egcd->gsd", weights.astype(y_e.dtype), y_e)


def _per_slot(values: Array, slot_ids: Array, num_slots: int, fill) -> Array:
    """Each kept choice's value at its slot: <[G_l, S, K]> -> <[G_l, E*C]>, ``fill`` in the empty
    slots (a slot holds at most one choice; choices not kept, slot ``E * C``, are dropped)."""
    num_groups = slot_ids.shape[0]
    out = jnp.full((num_groups, num_slots), fill, values.dtype)
    return out.at[jnp.arange(num_groups)[:, None], slot_ids.reshape(num_groups, -1)].set(
        values.reshape(num_groups, -1), mode="drop")


def _dispatch_gather(x: Array, slot_ids: Array, num_experts: int, capacity: int) -> Array:
    """Gathers each slot's token: [G_l, S, d], <int32>[G_l, S, K] -> [E, G_l, C, d].

    ``slot_ids`` holds ``e * C + c`` for kept choices and ``E * C`` for the rest.
    """
    num_groups, group_size, d_model = x.shape
    tokens = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None], slot_ids.shape)
    # [G_l, E*C] token of each slot; empty slots point at an appended zero row (index S).
    token_of_slot = _per_slot(tokens, slot_ids, num_experts * capacity, group_size)
    x_pad = jnp.concatenate([x, jnp.zeros((num_groups, 1, d_model), x.dtype)], axis=1)
    x_e = jax.vmap(lambda rows, idx: rows[idx])(x_pad, token_of_slot)  # [G_l, E*C, d]
    return x_e.reshape(num_groups, num_experts, capacity, d_model).transpose(1, 0, 2, 3)


def _combine_gather(y_e: Array, slot_ids: Array, weights: Array) -> Array:
    """Gathers each choice's slot and weights it: [E, G_l, C, d], [G_l, S, K] -> [G_l, S, d]."""
    num_experts, num_groups, capacity, d_model = y_e.shape
    y_flat = y_e.transpose(1, 0, 2, 3).reshape(num_groups, num_experts * capacity, d_model)
    y_pad = jnp.concatenate([y_flat, jnp.zeros((num_groups, 1, d_model), y_e.dtype)], axis=1)
    picked = jax.vmap(lambda rows, idx: rows[idx])(y_pad, slot_ids)  # [G_l, S, K, d]
    return jnp.einsum("gsk,gskd->gsd", weights.astype(y_e.dtype), picked)


def _local_experts(
    x: Array,
    routed: tuple[Array, Array],
    weights: dict[str, Array],
    adapters: dict[str, Array] | None,
    dropout_rng: Array | None,
    *,
    dispatch_impl: str,
    num_experts: int,
    capacity: int,
    activation: str,
    dtype,
    dropout_rate: float,
    expert_axis: str | None,
    model_axis: str | None,
    rng_axes: tuple[str, ...] = (),
) -> Array:
    """Dispatch -> experts -> combine on one shard (or the whole batch without a mesh).

    x: [G_l, S, d]; weights: local ``[E_l, d, f_l]``; routed: ``einsum`` -- the dispatch mask and
    combine weights <[G_l, S, E, C]>; ``gather`` -- slot ids <int32>[G_l, S, K] (``e * C + c``, or
    ``E * C`` for choices not kept) and gates <[G_l, S, K]>.
    """
    x = x.astype(dtype)
    if dispatch_impl == "einsum":
        dispatch, combine = routed
        x_e = _dispatch_einsum(x, dispatch)  # [E, G_l, C, d]
    else:
        slot_ids, gates = routed
        x_e = _dispatch_gather(x, slot_ids, num_experts, capacity)  # [E, G_l, C, d]
    if expert_axis is not None:
        # all_to_all over `expert`: split the E axis into the expert shards and send shard j to
        # device j; receive from every device of the row its groups' slots for our local experts.
        # [E, G_l, C, d] -> [E_l, n_expert * G_l, C, d].
        x_e = jax.lax.all_to_all(x_e, expert_axis, split_axis=0, concat_axis=1, tiled=True)
    if dropout_rng is not None:
        for axis in rng_axes:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis))
    y_e = experts_lib.expert_mlp(
        weights,
        x_e,
        activation=activation,
        dtype=dtype,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
    )
    if model_axis is not None:
        # The expert hidden dim f is split over `model`: sum the partial outputs.
        y_e = jax.lax.psum(y_e, model_axis)
    if adapters is not None:
        # Fused HyperExperts: the companion adapter of expert e on the tokens at expert e, ungated.
        # A slot holds one token, so  sum_slots combine * y_e + dispatch * h_e  equals
        # sum_slots dispatch * (gate_of_slot * y_e + h_e): one combine (and one all_to_all back)
        # carries both, with the gate applied on the expert side.
        if dispatch_impl == "einsum":
            slot_gate = jnp.sum(combine, axis=1).transpose(1, 0, 2)  # [E, G_l, C]
        else:
            slot_gate = _per_slot(gates, slot_ids, num_experts * capacity, 0)
            slot_gate = slot_gate.reshape(-1, num_experts, capacity).transpose(1, 0, 2)
        if expert_axis is not None:
            slot_gate = jax.lax.all_to_all(slot_gate, expert_axis, split_axis=0, concat_axis=1,
                                           tiled=True)
        h_e = experts_lib.adapter_mlp(adapters, x_e, dtype)
        y_e = y_e * slot_gate[..., None].astype(y_e.dtype) + h_e.astype(y_e.dtype)
    if expert_axis is not None:
        # all_to_all back over `expert`: return each group's slots to the device that owns the
        # group. [E_l, n_expert * G_l, C, d] -> [E, G_l, C, d].
        y_e = jax.lax.all_to_all(y_e, expert_axis, split_axis=1, concat_axis=0, tiled=True)
    if dispatch_impl == "einsum":
        y = _combine_einsum(y_e, dispatch if adapters is not None else combine)  # [G_l, S, d]
    else:
        if adapters is not None:
            kept = (slot_ids < num_experts * capacity).astype(dtype)
            y = _combine_gather(y_e, slot_ids, kept)
        else:
            y = _combine_gather(y_e, slot_ids, gates)
    return y


class MoeLayer(nn.Module):
    """Switch / GShard sparse MLP with optional expert parallelism.

    Attributes:
      num_experts: E.
      expert_hidden_dim: f.
      num_selected: K (1 = Switch top-1).
      activation: ``relu`` | ``gelu`` | ``gated-gelu`` (T5 v1.1) | ``gated-silu``.
      train_capacity_factor / eval_capacity_factor: capacity factors (must be > 0).
      min_capacity: lower bound on C.
      group_size: tokens per group S (None: one group per sequence). B*L must divide into groups
        and, on a mesh, the number of groups must divide over data*expert.
      router_kind, jitter_noise, router_use_bias, hyper_router_*: see ``routing.Router``.
      gate_normalization: see ``routing.route_tokens``.
      batch_prioritized_routing: BPR (encoders only).
      dropped_token_behavior: ``zero`` -- dropped tokens get 0 from the layer (the residual carries
        them; T5X and current HF); ``scale_input`` -- a token whose top-1 choice was dropped gets
        ``gate_top1 * x`` (``p_top1 * x`` with ``gate_normalization='none'``: older HF releases,
        which the official HyperMoE code patches).
      expert_dropout_rate: dropout on the experts' hidden activations.
      mesh: (data, expert, model) mesh; None runs everything on one device.
      dispatch_impl: how tokens reach their expert slots and come back: ``einsum`` -- one-hot
        dispatch / combine einsums (GShard / Switch; O(S * E * C * d) per group, MXU friendly);
        ``gather`` -- index gathers (O(E * C * d) per group; faster where einsums are not free,
        e.g. on CPU, and for large groups). Both give the same result.
    """

    num_experts: int
    expert_hidden_dim: int
    num_selected: int = 1
    activation: str = "relu"
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    group_size: int | None = None
    router_kind: routing.RouterKind = "linear"
    jitter_noise: float = 0.0
    router_use_bias: bool = False
    hyper_router_embed_dim: int | None = None
    hyper_router_hidden_dim: int = 256
    gate_normalization: routing.GateNormalization = "none"
    batch_prioritized_routing: bool = False
    dropped_token_behavior: DroppedTokenBehavior = "zero"
    expert_dropout_rate: float = 0.0
    mesh: Mesh | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    dispatch_impl: DispatchImpl = "einsum"

    def setup(self):
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"MoeLayer.{name} must be positive, got {getattr(self, name)}; "
                    "typical values are 1.25 (train) and 2.0 (eval)."
                )
        if self.dropped_token_behavior not in ("zero", "scale_input"):
            raise ValueError(
                f"dropped_token_behavior must be 'zero' or 'scale_input', "
                f"got {self.dropped_token_behavior!r}"
            )
        if self.dispatch_impl not in DISPATCH_IMPLS:
            raise ValueError(
                f"dispatch_impl must be one of {DISPATCH_IMPLS}, got {self.dispatch_impl!r}"
            )
        n_expert = part.mesh_axis_size(self.mesh, part.EXPERT)
        if self.num_experts % n_expert:
            raise ValueError(
                f"num_experts={self.num_experts} is not divisible by the mesh's expert axis "
                f"({n_expert}); choose an expert-parallel size that divides the expert count."
            )
        self.router = routing.Router(
            num_experts=self.num_experts,
            kind=self.router_kind,
            jitter_noise=self.jitter_noise,
            use_bias=self.router_use_bias,
            hyper_embed_dim=self.hyper_router_embed_dim,
            hyper_hidden_dim=self.hyper_router_hidden_dim,
        )
        self.experts = experts_lib.MlpExperts(
            num_experts=self.num_experts,
            hidden_dim=self.expert_hidden_dim,
            activation=self.activation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _group(self, num_tokens: int, seq_len: int) -> tuple[int, int]:
        size = self.group_size or seq_len
        if num_tokens % size:
            raise ValueError(
                f"{num_tokens} tokens (batch*length) do not divide into groups of "
                f"group_size={size}; choose a group size that divides batch*length."
            )
        num_groups = num_tokens // size
        shards = part.mesh_axis_size(self.mesh, part.TOKEN_SHARDS)
        if num_groups % shards:
            raise ValueError(
                f"{num_groups} token groups cannot be split over data*expert={shards} devices; "
                f"make (batch*length/group_size) a multiple of {shards} (smaller group_size or "
                "larger batch)."
            )
        return num_groups, size

    def __call__(
        self,
        x: Array,
        *,
        deterministic: bool = True,
        padding_mask: Array | None = None,
        active_k: Array | int | None = None,
        adapters: dict[str, Array] | None = None,
    ) -> tuple[Array, MoeAux]:
        """Applies the layer.

        Args:
          x: <[B, L, d]> token features.
          deterministic: eval mode (no jitter, no dropout, eval capacity factor).
          padding_mask: optional <[B, L]>, nonzero for real tokens.
          active_k: optional traced number of experts per token (<= num_selected).
          adapters: optional fused companion adapters (``experts.ADAPTER_KEYS``, leading dim E),
            applied ungated to the tokens each expert keeps; top-1 only.

        Returns:
          ``(y <[B, L, d]>, MoeAux)``.
        """
        batch, seq_len, d_model = x.shape
        num_groups, group_size = self._group(batch * seq_len, seq_len)
        if adapters is not None and self.num_selected != 1:
            raise ValueError("Fused adapters are defined for top-1 routing only (num_selected=1).")
        xg = x.reshape(num_groups, group_size, d_model)
        xg = part.with_logical_constraint(xg, (part.EXPERT_GROUP, part.LENGTH, part.EMBED))
        mask = None if padding_mask is None else padding_mask.reshape(num_groups, group_size)

        logits = self.router(xg, deterministic=deterministic)
        cf = self.eval_capacity_factor if deterministic else self.train_capacity_factor
        capacity = routing.expert_capacity(
            group_size, self.num_experts, self.num_selected, cf, self.min_capacity
        )
        r = routing.route_tokens(
            logits,
            num_selected=self.num_selected,
            capacity=capacity,
            padding_mask=mask,
            active_k=active_k,
            batch_prioritized=self.batch_prioritized_routing,
            gate_normalization=self.gate_normalization,
        )
        weights = self.experts(d_model)
        use_dropout = self.expert_dropout_rate > 0 and not deterministic
        dropout_rng = self.make_rng("dropout") if use_dropout else None

        if self.dispatch_impl == "einsum":
            routed = (r.dispatch_mask, r.combine_weights)
        else:
            no_slot = self.num_experts * capacity
            slot_ids = jnp.where(r.kept, r.expert_index * capacity + r.slot, no_slot)
            routed = (slot_ids.astype(jnp.int32), r.gates)
        local = functools.partial(
            _local_experts,
            dispatch_impl=self.dispatch_impl,
            num_experts=self.num_experts,
            capacity=capacity,
            activation=self.activation,
            dtype=self.dtype,
            dropout_rate=self.expert_dropout_rate if use_dropout else 0.0,
        )
        if self.mesh is None:
            y = local(xg, routed, weights, adapters, dropout_rng, expert_axis=None, model_axis=None)
        else:
            y = self._sharded(local, xg, routed, weights, adapters, dropout_rng)

        kept_top1 = r.kept[..., 0]
        if self.dropped_token_behavior == "scale_input":
            dropped = (r.active[..., 0] & ~kept_top1).astype(self.dtype)
            y = y + (dropped * r.gates[..., 0])[..., None] * xg.astype(self.dtype)
        y = part.with_logical_constraint(y, (part.EXPERT_GROUP, part.LENGTH, part.EMBED))
        aux = MoeAux(
            load_balance_loss=routing.load_balancing_loss(r),
            z_loss=routing.router_z_loss(r),
            metrics=routing.routing_metrics(r),
            expert_index=r.expert_index.reshape(batch, seq_len, self.num_selected),
            kept=r.kept.reshape(batch, seq_len, self.num_selected),
        )
        return y.reshape(batch, seq_len, d_model).astype(x.dtype), aux

    def _sharded(self, local, xg, routed, weights, adapters, dropout_rng):
        mesh = self.mesh
        spec = part.logical_to_mesh_spec
        tokens = PartitionSpec(part.TOKEN_SHARDS)
        w_specs = {n: spec(axes) for n, axes in experts_lib.expert_weight_specs(weights).items()}
        a_specs = None if adapters is None else {n: PartitionSpec(part.EXPERT) for n in adapters}
        model_axis = part.MODEL if mesh.shape[part.MODEL] > 1 else None
        fn = functools.partial(
            local,
            expert_axis=part.EXPERT,
            model_axis=model_axis,
            rng_axes=part.MESH_AXES,
        )
        sharded = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(
                tokens,
                (tokens, tokens),
                w_specs,
                a_specs,
                None if dropout_rng is None else PartitionSpec(),
            ),
            out_specs=tokens,
            check_vma=False,
        )
        return sharded(xg, routed, weights, adapters, dropout_rng)
