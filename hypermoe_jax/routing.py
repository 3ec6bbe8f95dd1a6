"""Tokens-choose routing: router logits, top-k selection, capacity, token priority, aux losses.

Shapes: G token groups, S tokens per group, E experts, K choices per token, C expert capacity.

The router produces float32 logits ``[G, S, E]``; ``route_tokens`` turns them into a frozen
``Routing`` (dispatch mask, combine weights, the top-k choices before capacity, ...). Aux losses and
metrics are free functions of a ``Routing`` so they can be computed wherever the layer runs
(also under ``nn.scan``).

Router kinds (``Router.kind``):

* ``linear``        -- a trainable ``[d, E]`` kernel (Switch / GShard);
* ``frozen_random`` -- a random ``[d, E]`` kernel, N(0, 0.02), never trained (SMoE-Dropout). It
  lives in the ``frozen`` variable collection, not in ``params``: optimizers never see it,
  checkpoints keep it;
* ``hyper``         -- HyperRouter: a trainable router embedding ``r`` and a frozen per-layer
  hypernetwork ``H(r) = L2 relu(L1 r)`` generating ``[E, d + 1]`` router weights and biases.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from hypermoe_jax import partitioning as part

Array = jax.Array

# The variable collection of weights that are saved but never trained.
FROZEN = "frozen"
# The rng stream of router jitter.
JITTER = "jitter"

RouterKind = Literal["linear", "frozen_random", "hyper"]
GateNormalization = Literal["none", "softmax_topk"]

default_router_init = nn.initializers.normal(stddev=2e-2)


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
    gate_normalization: GateNormalization = "none",
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


def load_balancing_loss(routing: Routing) -> Array:
    """Switch load-balance loss ``E * sum_e f_e * P_e``, averaged over groups.

    ``f_e``: fraction of (real) tokens that chose expert e among their active top-k (before
    capacity); ``P_e``: mean router probability of expert e over real tokens. Groups without a
    real token are left out of the average. Equals 1 for a perfectly balanced top-1 router (k for
    top-k, since each token counts once for each of its k experts).
    """
    num_experts = routing.router_probs.shape[-1]
    chose = jax.nn.one_hot(routing.expert_index, num_experts) * routing.active[..., None]
    chose = jnp.max(chose, axis=-2)  # [G, S, E]
    mask = routing.token_mask[..., None]
    frac = _masked_mean(chose, mask, axis=1)  # [G, E]
    prob = _masked_mean(routing.router_probs, mask, axis=1)  # [G, E]
    per_group = num_experts * jnp.sum(frac * prob, axis=-1)  # [G]
    has_tokens = jnp.max(routing.token_mask, axis=-1)  # [G]
    return _masked_mean(per_group, has_tokens, axis=0)


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


# --------------------------------------------------------------------------------------------
# Router module
# --------------------------------------------------------------------------------------------


def apply_jitter(x: Array, noise: float, rng: Array) -> Array:
    """Multiplicative jitter ``x * U(1 - noise, 1 + noise)`` (Switch)."""
    return x * jax.random.uniform(rng, x.shape, x.dtype, 1.0 - noise, 1.0 + noise)


class Router(nn.Module):
    """Produces float32 router logits ``[..., E]`` from token features ``[..., d]``.

    Attributes:
      num_experts: E.
      kind: ``linear`` | ``frozen_random`` | ``hyper`` (see module docstring).
      jitter_noise: multiplicative jitter on the router inputs in training (rng stream ``jitter``).
      use_bias: add a trainable bias (``linear`` only; HyperRouter generates its own bias).
      hyper_embed_dim: HyperRouter embedding size d_r (None = d_model, as the official code).
      hyper_hidden_dim: HyperRouter hypernetwork hidden size.
    """

    num_experts: int
    kind: RouterKind = "linear"
    jitter_noise: float = 0.0
    use_bias: bool = False
    hyper_embed_dim: int | None = None
    hyper_hidden_dim: int = 256
    kernel_init: nn.initializers.Initializer = default_router_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        x = x.astype(jnp.float32)
        if self.jitter_noise > 0 and not deterministic:
            x = apply_jitter(x, self.jitter_noise, self.make_rng(JITTER))
        d_model = x.shape[-1]
        if self.kind == "linear":
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, (part.EMBED, part.UNMODELED)),
                (d_model, self.num_experts),
                jnp.float32,
            )
            logits = jnp.einsum("...d,de->...e", x, kernel)
            if self.use_bias:
                bias = self.param(
                    "bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, (part.UNMODELED,)),
                    (self.num_experts,),
                    jnp.float32,
                )
                logits = logits + bias
            return logits
        if self.kind == "frozen_random":
            kernel = self.variable(
                FROZEN,
                "kernel",
                lambda: nn.initializers.normal(0.02)(
                    self.make_rng("params"), (d_model, self.num_experts), jnp.float32
                ),
            ).value
            return jnp.einsum("...d,de->...e", x, jax.lax.stop_gradient(kernel))
        if self.kind == "hyper":
            weight, bias = HyperRouterWeights(
                num_experts=self.num_experts,
                embed_dim=self.hyper_embed_dim,
                hidden_dim=self.hyper_hidden_dim,
                name="hyper",
            )(d_model)
            return jnp.einsum("...d,ed->...e", x, weight) + bias
        raise ValueError(f"Unknown router kind {self.kind!r}; use linear, frozen_random or hyper.")


class HyperRouterWeights(nn.Module):
    """HyperRouter: router weights generated by a frozen hypernetwork from a trainable embedding.

    ``r``: trainable, N(0, 1), shape [d_r]. ``H(r) = L2 relu(L1 r + c1) + c2`` with
    L1: d_r -> hidden, L2: hidden -> E*(d+1), N(0, 0.02), biases 0, all frozen (collection
    ``frozen``).
    Returns ``W`` <float32>[E, d] and ``b`` <float32>[E] from ``reshape(H(r), [E, d + 1])``.
    """

    num_experts: int
    embed_dim: int | None = None
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, d_model: int) -> tuple[Array, Array]:
        d_r = self.embed_dim or d_model
        out = self.num_experts * (d_model + 1)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (part.HYPER,)),
            (d_r,),
            jnp.float32,
        )

        def frozen(name, shape, init):
            return self.variable(
                FROZEN, name, lambda: init(self.make_rng("params"), shape, jnp.float32)
            ).value

        normal = nn.initializers.normal(0.02)
        zeros = nn.initializers.zeros
        l1_kernel = frozen("l1_kernel", (d_r, self.hidden_dim), normal)
        l1_bias = frozen("l1_bias", (self.hidden_dim,), zeros)
        l2_kernel = frozen("l2_kernel", (self.hidden_dim, out), normal)
        l2_bias = frozen("l2_bias", (out,), zeros)
        frozen_params = jax.lax.stop_gradient((l1_kernel, l1_bias, l2_kernel, l2_bias))
        l1_kernel, l1_bias, l2_kernel, l2_bias = frozen_params
        h = jax.nn.relu(embedding @ l1_kernel + l1_bias)
        flat = (h @ l2_kernel + l2_bias).reshape(self.num_experts, d_model + 1)
        return flat[:, :d_model], flat[:, d_model]


def linear_k_schedule(step: Array | int, total_steps: int, k_min: int, k_max: int) -> Array:
    """SMoE-Dropout's growing k: ``round((k_max - k_min) * t / T) + k_min``, clipped to k_max."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / float(total_steps), 0.0, 1.0)
    return (jnp.round((k_max - k_min) * frac) + k_min).astype(jnp.int32)


def num_combinations(n: int, k: int) -> int:
    return math.comb(n, k)
