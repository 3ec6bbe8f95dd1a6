"""Dispatch: grouping and capacity, moving tokens to expert slots and back, expert parallelism.

Shapes: G groups (G_l on one token shard), S tokens per group, E experts (E_l on one expert
shard), C capacity, K choices per token, d model dim.

``DispatchConfig`` declares how tokens reach the experts: the token groups, the capacity factors,
what a dropped token gets, and the implementation. A routing decision becomes one of two typed
dispatch plans with the same methods and the same result:

* ``MaskDispatch``  -- one-hot einsums with the ``[G, S, E, C]`` dispatch mask and combine weights
  (GShard / Switch; ``O(S * E * C * d)`` per group, MXU friendly);
* ``SlotDispatch``  -- index gathers from each choice's slot ``e * C + c`` (``O(E * C * d)`` per
  group; cheaper where einsums are not free).

``impl='dropless'`` drops nothing: no capacity, tokens sorted by expert and ``ragged_dot``
(``dropless.DroplessDispatch``, ``layers/dropless.py``); it equals the two above whenever they drop
no token.

``run_experts`` runs dispatch -> experts -> combine. On a (data, expert, model) mesh it runs inside
``jax.shard_map``: tokens arrive split over (data, expert) by group, are dispatched locally to
``[E, G_l, C, d]``, exchanged with ``all_to_all`` over ``expert`` so that each device holds its own
experts' slots from every group of its data row, run through the local experts, and sent back.
Without a mesh the same code runs with the collectives left out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import backend, dropless, experts, routing
from hypermoe_jax.layers import checkpoint_names as names

Array = jax.Array
DroppedTokenBehavior = Literal["zero", "scale_input"]
DispatchImpl = Literal["auto", "einsum", "gather", "dropless"]
# The capacity dispatches (all give the same result; ``auto`` picks one by backend).
DISPATCH_IMPLS = ("einsum", "gather")
# No capacity: every routed choice reaches its expert (``layers/dropless.py``).
DROPLESS = "dropless"


@dataclasses.dataclass(frozen=True)
class DispatchConfig:
    """How tokens reach their experts.

    Attributes:
      train_capacity_factor / eval_capacity_factor: capacity ``C = max(min_capacity,
        round(cf * k * S / E))`` slots per expert and group, in training / evaluation (> 0).
      min_capacity: lower bound on C.
      expert_capacity: a fixed C, in training and evaluation, in place of the capacity factors
        and ``min_capacity`` (Hugging Face ``SwitchTransformers``' ``expert_capacity``: with one
        group per sequence, C slots per expert and sequence, given in sequence order). None: C
        from the factors. A decode step (one token per sequence) still drops nothing.
      group_size: tokens per routing group S (None: one group per sequence). B*L must divide into
        groups and, on a mesh, the number of groups must divide over data*expert.
      dropped_token_behavior: ``zero`` -- a token dropped by capacity gets 0 from the layer (the
        residual carries it; T5X and current HF); ``scale_input`` -- a token whose top-1 choice was
        dropped gets ``gate_top1 * x`` (older HF releases, which the official HyperMoE code
        patches).
      impl: ``einsum`` (``MaskDispatch``) | ``gather`` (``SlotDispatch``) | ``auto`` (by backend,
        ``backend.DEFAULTS``): capacity dispatches, all give the same result; or ``dropless``
        (``dropless.DroplessDispatch``): no capacity -- every routed choice reaches its expert
        (tokens sorted by expert, ``jax.lax.ragged_dot``); the capacity factors and
        ``min_capacity`` are unused and nothing is dropped. It equals the capacity dispatches
        whenever they drop nothing. Not chosen by ``auto``: it changes what the layer computes.
      dropless_exchange: the expert-parallel exchange of ``dropless``: ``ragged_all_to_all``
        (only the routed rows move) | ``all_to_all`` (each device's rows padded to the worst
        case: exact everywhere, XLA:CPU has no ragged all-to-all) | ``auto`` (by backend).
    """

    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    expert_capacity: int | None = None
    group_size: int | None = None
    dropped_token_behavior: DroppedTokenBehavior = "zero"
    impl: DispatchImpl = "auto"
    dropless_exchange: dropless.Exchange = "auto"

    def __post_init__(self):
        for name in ("train_capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"DispatchConfig.{name} must be positive, got {getattr(self, name)}; "
                    "typical values are 1.25 (train) and 2.0 (eval).")
        if self.expert_capacity is not None and self.expert_capacity < 1:
            raise ValueError(
                f"DispatchConfig.expert_capacity must be a positive number of slots per expert "
                f"and group, or None (capacity from the capacity factors); got "
                f"{self.expert_capacity}.")
        if self.dropped_token_behavior not in ("zero", "scale_input"):
            raise ValueError(
                "DispatchConfig.dropped_token_behavior must be 'zero' or 'scale_input', "
                f"got {self.dropped_token_behavior!r}")
        backend.check("dispatch", self.impl, (*DISPATCH_IMPLS, DROPLESS), "DispatchConfig.impl")
        backend.check("dropless_exchange", self.dropless_exchange, dropless.EXCHANGES,
                      "DispatchConfig.dropless_exchange")

    def capacity(self, group_size: int, num_experts: int, num_selected: int,
                 deterministic: bool) -> int:
        """Slots per expert and group (``expert_capacity``, else ``routing.expert_capacity`` at
        the mode's factor); with
        ``dropless``, S: an expert can take every token of the group, so routing keeps every
        choice (the dropless plan never builds per-slot buffers)."""
        if self.impl == DROPLESS:
            return group_size
        if self.expert_capacity is not None:
            return self.expert_capacity
        cf = self.eval_capacity_factor if deterministic else self.train_capacity_factor
        return routing.expert_capacity(group_size, num_experts, num_selected, cf,
                                       self.min_capacity)

    def groups(self, num_tokens: int, seq_len: int, mesh: Mesh | None) -> tuple[int, int]:
        """``(G, S)`` for ``num_tokens`` tokens of sequences of ``seq_len``; errors say why not."""
        size = self.group_size or seq_len
        if num_tokens % size:
            raise ValueError(
                f"{num_tokens} tokens (batch*length) do not divide into groups of "
                f"group_size={size}; choose a group size that divides batch*length."
            )
        num_groups = num_tokens // size
        shards = part.mesh_axis_size(mesh, part.TOKEN_SHARDS)
        if num_groups % shards:
            raise ValueError(
                f"{num_groups} token groups cannot be split over data*expert={shards} devices; "
                f"make (batch*length/group_size) a multiple of {shards} (smaller group_size or "
                "larger batch)."
            )
        return num_groups, size


# --------------------------------------------------------------------------------------------
# Dispatch plans
# --------------------------------------------------------------------------------------------


def _per_slot(values: Array, slot_ids: Array, num_slots: int, fill) -> Array:
    """Each kept choice's value at its slot: <[G_l, S, K]> -> <[G_l, E*C]>, ``fill`` in the empty
    slots (a slot holds at most one choice; choices not kept, slot ``E * C``, are dropped)."""
    num_groups = slot_ids.shape[0]
    out = jnp.full((num_groups, num_slots), fill, values.dtype)
    return out.at[jnp.arange(num_groups)[:, None], slot_ids.reshape(num_groups, -1)].set(
        values.reshape(num_groups, -1), mode="drop")


@struct.dataclass
class MaskDispatch:
    """One-hot dispatch (GShard / Switch).

    Attributes:
      dispatch_mask: <bool>[G, S, E, C] token s of group g goes to slot c of expert e.
      combine_weights: <float32>[G, S, E, C] gate weight on the kept slot, 0 elsewhere.
    """

    dispatch_mask: Array
    combine_weights: Array

    def dispatch(self, x: Array) -> Array:
        """[G_l, S, d] -> [E, G_l, C, d]: every expert's slots of the local groups."""
        return jnp.einsum("gsec,gsd->egcd", self.dispatch_mask.astype(x.dtype), x)

    def slot_gates(self) -> Array:
        """<[E, G_l, C]> the gate of the choice in each slot (0 in empty slots)."""
        return jnp.sum(self.combine_weights, axis=1).transpose(1, 0, 2)

    def combine(self, y_e: Array, gated: bool = True) -> Array:
        """[E, G_l, C, d] -> [G_l, S, d]: each token's slots, weighted by its gates (``gated``) or
        summed as they are (slots that already carry their gate)."""
        weights = self.combine_weights if gated else self.dispatch_mask
        return jnp.einsum("gsec,egcd->gsd", weights.astype(y_e.dtype), y_e)


@struct.dataclass
class SlotDispatch:
    """Gather dispatch by slot index.

    Attributes:
      slot_ids: <int32>[G, S, K] ``e * C + c`` for each kept choice, ``E * C`` for the rest.
      gates: <float32>[G, S, K] gate weight of each choice.
    """

    slot_ids: Array
    gates: Array
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.capacity

    def dispatch(self, x: Array) -> Array:
        """[G_l, S, d] -> [E, G_l, C, d]: gathers each slot's token."""
        num_groups, group_size, d_model = x.shape
        tokens = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None],
                                  self.slot_ids.shape)
        # [G_l, E*C] token of each slot; empty slots point at an appended zero row (index S).
        token_of_slot = _per_slot(tokens, self.slot_ids, self.num_slots, group_size)
        x_pad = jnp.concatenate([x, jnp.zeros((num_groups, 1, d_model), x.dtype)], axis=1)
        x_e = jax.vmap(lambda rows, idx: rows[idx])(x_pad, token_of_slot)  # [G_l, E*C, d]
        return x_e.reshape(num_groups, self.num_experts, self.capacity, d_model).transpose(
            1, 0, 2, 3)

    def slot_gates(self) -> Array:
        """<[E, G_l, C]> the gate of the choice in each slot (0 in empty slots)."""
        gate = _per_slot(self.gates, self.slot_ids, self.num_slots, 0)
        return gate.reshape(-1, self.num_experts, self.capacity).transpose(1, 0, 2)

    def combine(self, y_e: Array, gated: bool = True) -> Array:
        """[E, G_l, C, d] -> [G_l, S, d]: gathers each choice's slot and weights it by its gate
        (``gated``) or by 1 for kept choices (slots that already carry their gate)."""
        num_experts, num_groups, capacity, d_model = y_e.shape
        y_flat = y_e.transpose(1, 0, 2, 3).reshape(num_groups, num_experts * capacity, d_model)
        y_pad = jnp.concatenate([y_flat, jnp.zeros((num_groups, 1, d_model), y_e.dtype)], axis=1)
        picked = jax.vmap(lambda rows, idx: rows[idx])(y_pad, self.slot_ids)  # [G_l, S, K, d]
        weights = self.gates if gated else (self.slot_ids < self.num_slots)
        return jnp.einsum("gsk,gskd->gsd", weights.astype(y_e.dtype), picked)


Dispatch = MaskDispatch | SlotDispatch | dropless.DroplessDispatch


def make_dispatch(r: routing.Routing, impl: str, capacity: int,
                  dropless_exchange: str = backend.AUTO) -> Dispatch:
    """The dispatch plan of a routing decision (``impl``: ``einsum`` | ``gather`` | ``auto`` |
    ``dropless``; ``dropless_exchange``: see ``DispatchConfig``)."""
    if impl == DROPLESS:
        return dropless.DroplessDispatch(
            r.expert_index, r.gates, r.active, r.router_probs.shape[-1],
            backend.resolve("dropless_exchange", dropless_exchange))
    if backend.resolve("dispatch", impl) == "einsum":
        return MaskDispatch(r.dispatch_mask, r.combine_weights)
    num_experts = r.router_probs.shape[-1]
    slot_ids = jnp.where(r.kept, r.expert_index * capacity + r.slot, num_experts * capacity)
    return SlotDispatch(slot_ids.astype(jnp.int32), r.gates, num_experts, capacity)


# --------------------------------------------------------------------------------------------
# Experts on their slots, expert-parallel
# --------------------------------------------------------------------------------------------


def _to_experts(a: Array, expert_axis: str | None) -> Array:
    """all_to_all over ``expert``: split the E axis into the expert shards and send shard j to
    device j; receive from every device of the row its groups' slots for our local experts.
    [E, G_l, ...] -> [E_l, n_expert * G_l, ...]. The identity without a mesh."""
    if expert_axis is None:
        return a
    return jax.lax.all_to_all(a, expert_axis, split_axis=0, concat_axis=1, tiled=True)


def _from_experts(a: Array, expert_axis: str | None) -> Array:
    """all_to_all back over ``expert``: return each group's slots to the device that owns the
    group. [E_l, n_expert * G_l, ...] -> [E, G_l, ...]."""
    if expert_axis is None:
        return a
    return jax.lax.all_to_all(a, expert_axis, split_axis=1, concat_axis=0, tiled=True)


def _expert_shard(x, plan: Dispatch, weights, adapters, dropout_rng, *, activation, dtype,
                  dropout_rate, expert_axis=None, model_axis=None, model_split=False,
                  rng_axes=()):
    """Dispatch -> experts -> combine on one shard (or the whole batch without a mesh).

    With ``model_split`` the token groups arrive split over ``model`` too, so each device sends
    only its own groups through the ``all_to_all`` over ``expert``; an ``all_gather`` over
    ``model`` then gives every model shard all the groups for its slice ``f_l`` of the expert
    hidden dim, and a reduce-scatter (``psum_scatter``) over ``model`` sums the partial outputs
    straight back into each device's own groups. Otherwise the groups are replicated over
    ``model`` and every model shard exchanges all of them.
    """
    x_e = _to_experts(plan.dispatch(x.astype(dtype)), expert_axis)  # [E_l, G, C, d]
    x_e = names.checkpoint_name(x_e, names.MOE_DISPATCHED)
    x_all = x_e
    if model_split:
        # [E_l, G, C, d] -> [E_l, n_model * G, C, d]: the groups of every model shard.
        x_all = jax.lax.all_gather(x_e, model_axis, axis=1, tiled=True)
    if dropout_rng is not None:
        for axis in rng_axes:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis))
    y_e = experts.expert_mlp(weights, x_all, activation=activation, dtype=dtype,
                             dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if model_split:
        # f is split over `model`: sum the partial outputs, each model shard keeping its groups.
        y_e = jax.lax.psum_scatter(y_e, model_axis, scatter_dimension=1, tiled=True)
    elif model_axis is not None:
        y_e = jax.lax.psum(y_e, model_axis)
    y_e = names.checkpoint_name(y_e, names.MOE_EXPERT_OUT)
    if adapters is None:
        return plan.combine(_from_experts(y_e, expert_axis))
    # Fused companion adapters: the adapter of expert e on the tokens at expert e, ungated. A slot
    # holds one token, so  sum_slots combine * y_e + dispatch * h_e  equals
    # sum_slots dispatch * (gate_of_slot * y_e + h_e): one combine (and one all_to_all back)
    # carries both, with the gate applied on the expert side.
    gate = _to_experts(plan.slot_gates(), expert_axis)  # [E_l, G, C]
    h_e = experts.adapter_mlp(adapters, x_e, dtype)
    y_e = y_e * gate[..., None].astype(y_e.dtype) + h_e.astype(y_e.dtype)
    return plan.combine(_from_experts(y_e, expert_axis), gated=False)


def run_experts(
    x: Array,
    plan: Dispatch,
    weights: dict[str, Array],
    *,
    activation: str,
    mesh: Mesh | None = None,
    adapters: dict[str, Array] | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    dtype: jnp.dtype = jnp.float32,
) -> Array:
    """The experts' (gated) output of every token: [G, S, d] -> [G, S, d].

    Args:
      x: <[G, S, d]> grouped tokens.
      plan: the dispatch plan (``make_dispatch``).
      weights: the expert weights (``experts.MlpExperts``), ``[E, d, f]`` / ``[E, f, d]``.
      mesh: a (data, expert, model) mesh: run expert-parallel inside ``jax.shard_map``. The
        groups are split over data x expert, and over model too when G divides (then no model
        shard repeats another's ``all_to_all``; see ``_expert_shard``).
      adapters: optional fused companion adapters (``experts.ADAPTER_KEYS``, leading dim E),
        applied ungated to the tokens each expert keeps.
      dropout_rate / dropout_rng: dropout on the experts' hidden activations.
    """
    if isinstance(plan, dropless.DroplessDispatch):
        return dropless.run_experts(x, plan, weights, activation=activation, mesh=mesh,
                                    adapters=adapters, dropout_rate=dropout_rate,
                                    dropout_rng=dropout_rng, dtype=dtype)
    fn = functools.partial(_expert_shard, activation=activation, dtype=dtype,
                           dropout_rate=dropout_rate if dropout_rng is not None else 0.0)
    if mesh is None:
        return fn(x, plan, weights, adapters, dropout_rng)
    n_model = mesh.shape[part.MODEL]
    # (Always when model is 1: G divides over data x expert, see DispatchConfig.groups.)
    model_split = x.shape[0] % part.mesh_axis_size(mesh, part.MESH_AXES) == 0
    tokens = PartitionSpec(part.MESH_AXES if model_split else part.TOKEN_SHARDS)
    w_specs = {n: part.logical_to_mesh_spec(axes)
               for n, axes in experts.expert_weight_specs(weights).items()}
    a_specs = None if adapters is None else {n: PartitionSpec(part.EXPERT) for n in adapters}
    sharded = jax.shard_map(
        functools.partial(fn, expert_axis=part.EXPERT,
                          model_axis=part.MODEL if model_split or n_model > 1 else None,
                          model_split=model_split, rng_axes=part.MESH_AXES),
        mesh=mesh,
        in_specs=(tokens, jax.tree.map(lambda _: tokens, plan), w_specs, a_specs,
                  None if dropout_rng is None else PartitionSpec()),
        out_specs=tokens,
    )
    return sharded(x, plan, weights, adapters, dropout_rng)
