"""Tokens-choose routing: top-k selection, capacity, token priority, aux losses and metrics.

Shapes: G token groups, S tokens per group, E experts, K choices per token, C expert capacity.

A router (``routers.Router``) produces float32 logits ``[G, S, E]``; ``route_tokens`` turns them
into a frozen ``Routing`` (dispatch mask, combine weights, the top-k choices before capacity, each
kept choice's slot, ...). Aux losses and metrics are free functions of a ``Routing`` so they can be
computed wherever the layer runs (also under ``nn.scan``). ``linear_k_schedule`` is SMoE-Dropout's
growing k.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------


def expert_capacity(
    tokens_per_group: int,
    num_experts: int,
    num_selected: int,
    capacity_factor: float,
    min_capacity: int = 4,
) -> int:
    """``C = max(min_capacity, round(cf * k * S / E))``."""
    if capacity_factor <= 0:
        raise ValueError(
            f"capacity_factor must be positive, got {capacity_factor}; it scales the per-expert "
            "buffer (1.0 = exactly balanced). Use e.g. 1.25 for training and 2.0 for eval."
        )
    return max(
        int(min_capacity),
        int(round(capacity_factor * num_selected * tokens_per_group / num_experts)),
    )


# --------------------------------------------------------------------------------------------
# Routing result
# --------------------------------------------------------------------------------------------


@struct.dataclass
class Routing:
    """What the router decided for a batch of token groups.

    Attributes:
      dispatch_mask: <bool>[G, S, E, C] token s of group g goes to slot c of expert e.
      combine_weights: <float32>[G, S, E, C] gate weight on the kept slot, 0 elsewhere.
      expert_index: <int32>[G, S, K] the top-k experts of each token before capacity, in rank order.
      gates: <float32>[G, S, K] gate weight of each choice (0 for inactive choices).
      active: <bool>[G, S, K] choice is in use (not padding, rank < active k).
      kept: <bool>[G, S, K] choice is active and fitted into its expert's capacity.
      router_logits: <float32>[G, S, E].
      router_probs: <float32>[G, S, E] softmax over all experts.
      token_mask: <float32>[G, S] 1 for real tokens, 0 for padding.
      slot: <int32>[G, S, K] slot of each choice in its expert's buffer (valid where ``kept``);
        with ``expert_index`` it lets a layer dispatch by gather instead of by einsum.
    """

    dispatch_mask: Array
    combine_weights: Array
    expert_index: Array
    gates: Array
    active: Array
    kept: Array
    router_logits: Array
    router_probs: Array
    token_mask: Array
    slot: Array


def route_tokens(
    router_logits: Array,
    *,
    num_selected: int,
    capacity: int,
    padding_mask: Array | None = None,
    active_k: Array | int | None = None,
    batch_prioritized: bool = False,
    gate_normalization: str = "none",
) -> Routing:
    """Tokens choose their top-k experts; experts keep the first ``capacity`` by priority.

    Priority: all rank-0 (top-1) choices come before all rank-1 choices, and so on; within a rank,
    by position in the group, or -- with ``batch_prioritized`` (encoders only: it looks at the whole
    group) -- by descending top-1 router probability.

    Args:
      router_logits: <float32>[G, S, E].
      num_selected: K, the (maximum) number of experts per token; static.
      capacity: C, slots per expert per group; static.
      padding_mask: optional [G, S], nonzero for real tokens. Padding is never dispatched.
      active_k: optional (traced) number of choices in use, clipped to [1, K]. Ranks >= active_k
        are masked, so changing k does not recompile (SMoE-Dropout's growing k, any-k inference).
      batch_prioritized: Batch Prioritized Routing (Riquelme et al. 2021).
      gate_normalization: ``none`` -- the gate is the softmax probability over all experts (Switch,
        so the router also learns from the task loss); ``softmax_topk`` -- softmax over the active
        selected logits (SMoE-Dropout, renormalised top-k).
    """
    logits = router_logits.astype(jnp.float32)
    num_groups, group_size, num_experts = logits.shape
    if not 1 <= num_selected <= num_experts:
        raise ValueError(f"num_selected must be in [1, {num_experts}], got {num_selected}")
    probs = jax.nn.softmax(logits, axis=-1)
    if padding_mask is None:
        token_mask = jnp.ones((num_groups, group_size), jnp.float32)
    else:
        token_mask = (padding_mask > 0).astype(jnp.float32)

    # [G, S, K] top-k choices before capacity, in rank order.
    top_logits, expert_index = jax.lax.top_k(logits, num_selected)
    ranks = jnp.arange(num_selected)
    if active_k is None:
        rank_active = jnp.ones((num_selected,), bool)
    else:
        # At least one choice: with none, ``softmax_topk`` would normalise over nothing (NaN).
        rank_active = ranks < jnp.clip(active_k, 1, num_selected)
    active = (token_mask[..., None] > 0) & rank_active  # [G, S, K]

    if gate_normalization == "none":
        gates = jnp.take_along_axis(probs, expert_index, axis=-1)
    elif gate_normalization == "softmax_topk":
        masked = jnp.where(rank_active, top_logits, -jnp.inf)
        gates = jax.nn.softmax(masked, axis=-1)
    else:
        raise ValueError(f"Unknown gate_normalization {gate_normalization!r}")
    gates = jnp.where(active, gates, 0.0)

    # [G, S, K, E]
    choice_onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)
    choice_onehot = choice_onehot * active[..., None].astype(jnp.int32)

    if batch_prioritized:
        # Sort tokens of each group by descending top-1 probability (padding last).
        score = jnp.where(token_mask > 0, jnp.max(probs, axis=-1), -1.0)
        order = jnp.argsort(-score, axis=-1, stable=True)  # [G, S]
        inverse = jnp.argsort(order, axis=-1)
        ordered = jnp.take_along_axis(choice_onehot, order[:, :, None, None], axis=1)
    else:
        ordered = choice_onehot

    # Priority order: rank-major, then token order. [G, K, S, E] -> [G, K*S, E]
    flat = jnp.swapaxes(ordered, 1, 2).reshape(num_groups, num_selected * group_size, num_experts)
    position = jnp.cumsum(flat, axis=1) - 1  # slot each choice would take in its expert
    position = position.reshape(num_groups, num_selected, group_size, num_experts)
    position = jnp.swapaxes(position, 1, 2)  # [G, S, K, E] (token order as in ``ordered``)
    if batch_prioritized:
        position = jnp.take_along_axis(position, inverse[:, :, None, None], axis=1)
    # [G, S, K] slot of each choice (only meaningful where active).
    slot = jnp.sum(position * choice_onehot, axis=-1)
    kept = active & (slot < capacity)

    slot_onehot = jax.nn.one_hot(jnp.where(kept, slot, capacity), capacity, dtype=jnp.float32)
    kept_onehot = choice_onehot.astype(jnp.float32) * kept[..., None]  # [G, S, K, E]
    dispatch = jnp.einsum("gske,gskc->gsec", kept_onehot, slot_onehot)
    combine = jnp.einsum("gske,gskc->gsec", kept_onehot * gates[..., None], slot_onehot)
    return Routing(
        dispatch_mask=dispatch.astype(bool),
        combine_weights=combine,
        expert_index=expert_index.astype(jnp.int32),
        gates=gates,
        active=active,
        kept=kept,
        router_logits=logits,
        router_probs=probs,
        token_mask=token_mask,
        slot=jnp.where(kept, slot, 0).astype(jnp.int32),
    )


# --------------------------------------------------------------------------------------------
# Aux losses and metrics (free functions)
# --------------------------------------------------------------------------------------------


def _masked_mean(x: Array, mask: Array, axis) -> Array:
    mask = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def load_balance_statistics(routing: Routing) -> tuple[Array, Array, Array]:
    """Per-group statistics of the Switch load-balance loss: ``(f [G, E], P [G, E], has_tokens
    [G])``.

    ``f_e``: fraction of (real) tokens that chose expert e among their active top-k (before
    capacity); ``P_e``: mean router probability of expert e over real tokens; ``has_tokens``:
    whether the group holds a real token. ``load_balancing_loss`` combines them per layer;
    ``losses.moe_losses_and_metrics`` can pool them over the layers of a stack first (HF).
    """
    num_experts = routing.router_probs.shape[-1]
    chose = jax.nn.one_hot(routing.expert_index, num_experts) * routing.active[..., None]
    chose = jnp.max(chose, axis=-2)  # [G, S, E]
    mask = routing.token_mask[..., None]
    frac = _masked_mean(chose, mask, axis=1)  # [G, E]
    prob = _masked_mean(routing.router_probs, mask, axis=1)  # [G, E]
    return frac, prob, jnp.max(routing.token_mask, axis=-1)


def balance_loss_from_statistics(frac: Array, prob: Array, has_tokens: Array) -> Array:
    """``E * sum_e f_e * P_e`` per group, averaged over the groups that hold a real token."""
    per_group = frac.shape[-1] * jnp.sum(frac * prob, axis=-1)  # [G]
    return _masked_mean(per_group, has_tokens, axis=0)


def load_balancing_loss(routing: Routing) -> Array:
    """Switch load-balance loss ``E * sum_e f_e * P_e``, averaged over groups
    (``load_balance_statistics``). Groups without a real token are left out of the average.
    Equals 1 for a perfectly balanced top-1 router (k for top-k, since each token counts once
    for each of its k experts).
    """
    return balance_loss_from_statistics(*load_balance_statistics(routing))


def router_z_loss(routing: Routing) -> Array:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` over real tokens."""
    lse = jax.nn.logsumexp(routing.router_logits, axis=-1)
    return _masked_mean(lse**2, routing.token_mask, axis=(0, 1))


def routing_metrics(routing: Routing) -> dict[str, Array]:
    """Per-layer routing metrics.

    * ``expert_load``: <float32>[E] fraction of the active choices (before capacity) per expert;
    * ``dropped_fraction``: fraction of active choices that did not fit into capacity;
    * ``router_entropy``: mean entropy (nats) of the router distribution over real tokens;
    * ``router_confidence``: mean top-1 router probability over real tokens.
    """
    num_experts = routing.router_probs.shape[-1]
    chose = jax.nn.one_hot(routing.expert_index, num_experts) * routing.active[..., None]
    counts = jnp.sum(chose, axis=(0, 1, 2))
    num_active = jnp.maximum(jnp.sum(routing.active), 1)
    probs = routing.router_probs
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
    return {
        "expert_load": counts / num_active,
        "dropped_fraction": jnp.sum(routing.active & ~routing.kept) / num_active,
        "router_entropy": _masked_mean(entropy, routing.token_mask, axis=(0, 1)),
        "router_confidence": _masked_mean(jnp.max(probs, -1), routing.token_mask, axis=(0, 1)),
    }


def linear_k_schedule(step: Array | int, total_steps: int, k_min: int, k_max: int) -> Array:
    """SMoE-Dropout's growing k: ``round((k_max - k_min) * t / T) + k_min``, clipped to k_max."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(total_steps), 0.0, 1.0)
    return (jnp.round((k_max - k_min) * frac) + k_min).astype(jnp.int32)
