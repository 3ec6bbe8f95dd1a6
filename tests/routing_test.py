"""Routing: hand-built router logits whose routing is known, aux losses against numpy formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hypermoe_jax.layers import routers, routing

BIG = 10.0  # logit margin that makes a choice unambiguous

# Jitted once per shape: much faster on CPU than dispatching every op eagerly.
route = jax.jit(
    routing.route_tokens,
    static_argnames=("num_selected", "capacity", "batch_prioritized", "gate_normalization"),
)
load_balancing_loss = jax.jit(routing.load_balancing_loss)
router_z_loss = jax.jit(routing.router_z_loss)
routing_metrics = jax.jit(routing.routing_metrics)


def logits_from_choices(choices, num_experts, margins=None):
    """<[G, S, E]> logits whose top-k of token s (in rank order) is ``choices[g][s]``."""
    choices = np.asarray(choices)
    num_groups, group_size, k = choices.shape
    logits = np.zeros((num_groups, group_size, num_experts), np.float32)
    for g in range(num_groups):
        for s in range(group_size):
            for rank, e in enumerate(choices[g, s]):
                logits[g, s, e] = BIG * (k - rank)
            if margins is not None:
                logits[g, s] *= margins[g][s]
    return jnp.asarray(logits)


def slots(r: routing.Routing):
    """{(g, s): [(e, c), ...]} from the dispatch mask."""
    out = {}
    for g, s, e, c in zip(*np.nonzero(np.asarray(r.dispatch_mask))):
        out.setdefault((int(g), int(s)), []).append((int(e), int(c)))
    return out


def np_softmax(x, axis=-1):
    x = np.asarray(x, np.float64)
    z = np.exp(x - x.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


# --------------------------------------------------------------------------------------------
# Capacity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group_size, num_experts, k, cf, min_capacity, expected",
    [
        (16, 4, 1, 1.0, 4, 4),  # 16 / 4 = 4
        (16, 4, 1, 1.0, 1, 4),
        (64, 8, 2, 1.25, 4, 20),  # 1.25 * 2 * 64 / 8 = 20
        (64, 8, 1, 1.25, 4, 10),
        (16, 8, 1, 0.5, 1, 1),  # round(1.0) = 1
        (16, 8, 1, 0.5, 4, 4),  # min_capacity wins
        (30, 4, 1, 1.0, 1, 8),  # round(7.5) = 8
        (26, 4, 1, 1.0, 1, 6),  # round(6.5) = 6 (Python rounds half to even)
        (512, 32, 1, 2.0, 4, 32),
    ],
)
def test_capacity_formula(group_size, num_experts, k, cf, min_capacity, expected):
    assert routing.expert_capacity(group_size, num_experts, k, cf, min_capacity) == expected


@pytest.mark.parametrize("cf", [0.0, -0.5])
def test_capacity_factor_must_be_positive(cf):
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        routing.expert_capacity(16, 4, 1, cf)


# --------------------------------------------------------------------------------------------
# Priority, capacity, padding
# --------------------------------------------------------------------------------------------


def test_priority_top1_before_top2_then_position():
    # 4 tokens, 2 experts, capacity 2.  top-1: e0 e0 e0 e1; top-2: e1 e1 e1 e0.
    logits = logits_from_choices([[[0, 1], [0, 1], [0, 1], [1, 0]]], 2)
    r = route(logits, num_selected=2, capacity=2)
    # Expert 0: tokens 0, 1 (rank 0) fill it; token 2 (rank 0) and token 3 (rank 1) are dropped.
    # Expert 1: token 3's rank-0 choice comes before token 0's rank-1 choice.
    assert slots(r) == {(0, 0): [(0, 0), (1, 1)], (0, 1): [(0, 1)], (0, 3): [(1, 0)]}
    np.testing.assert_array_equal(
        r.kept[0], [[True, True], [True, False], [False, False], [True, False]]
    )
    np.testing.assert_array_equal(r.expert_index[0], [[0, 1], [0, 1], [0, 1], [1, 0]])
    metrics = routing_metrics(r)
    np.testing.assert_allclose(metrics["dropped_fraction"], 4 / 8)


def test_priority_by_position_within_rank():
    # All 6 tokens want expert 1 first; capacity 3 keeps the first 3 positions in slot order.
    logits = logits_from_choices([[[1]] * 6], 3)
    r = route(logits, num_selected=1, capacity=3)
    assert slots(r) == {(0, 0): [(1, 0)], (0, 1): [(1, 1)], (0, 2): [(1, 2)]}
    np.testing.assert_array_equal(r.kept[0, :, 0], [1, 1, 1, 0, 0, 0])


def test_groups_are_independent():
    logits = logits_from_choices([[[0]] * 3, [[0]] * 3], 2)
    r = route(logits, num_selected=1, capacity=2)
    np.testing.assert_array_equal(r.kept[..., 0], [[1, 1, 0], [1, 1, 0]])


def test_padding_never_dispatched_and_takes_no_slot():
    logits = logits_from_choices([[[0], [0], [0], [0]]], 2)
    mask = jnp.array([[0, 0, 1, 1]])
    r = route(logits, num_selected=1, capacity=2, padding_mask=mask)
    # Padding at positions 0, 1 would have taken both slots; real tokens 2, 3 get them instead.
    assert slots(r) == {(0, 2): [(0, 0)], (0, 3): [(0, 1)]}
    np.testing.assert_array_equal(r.active[0, :, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(r.gates[0, :2], 0.0)
    np.testing.assert_array_equal(r.combine_weights[0, :2], 0.0)
    metrics = routing_metrics(r)
    np.testing.assert_allclose(metrics["dropped_fraction"], 0.0)
    np.testing.assert_allclose(metrics["expert_load"], [1.0, 0.0])


def test_batch_prioritized_routing():
    # All tokens choose expert 0, with increasing confidence along the group.
    margins = [[0.1, 0.2, 0.3, 0.4]]
    logits = logits_from_choices([[[0]] * 4], 4, margins)
    plain = route(logits, num_selected=1, capacity=2)
    bpr = route(logits, num_selected=1, capacity=2, batch_prioritized=True)
    np.testing.assert_array_equal(plain.kept[0, :, 0], [1, 1, 0, 0])
    # The most confident tokens win: token 3 gets slot 0, token 2 slot 1.
    np.testing.assert_array_equal(bpr.kept[0, :, 0], [0, 0, 1, 1])
    assert slots(bpr) == {(0, 3): [(0, 0)], (0, 2): [(0, 1)]}


def test_batch_prioritized_padding_last():
    margins = [[0.1, 0.2, 0.3, 0.4]]
    logits = logits_from_choices([[[0]] * 4], 4, margins)
    mask = jnp.array([[1, 1, 1, 0]])
    r = route(logits, num_selected=1, capacity=2, padding_mask=mask, batch_prioritized=True)
    np.testing.assert_array_equal(r.kept[0, :, 0], [0, 1, 1, 0])


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------


def random_logits(shape, seed=0, scale=2.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def test_gate_is_softmax_prob_of_chosen_expert():
    logits = random_logits((2, 8, 4))
    r = route(logits, num_selected=2, capacity=16)
    probs = np_softmax(logits)
    order = np.argsort(-np.asarray(logits), axis=-1)[..., :2]
    np.testing.assert_array_equal(r.expert_index, order)
    np.testing.assert_allclose(r.gates, np.take_along_axis(probs, order, -1), rtol=1e-6)
    # Everything fits: combine holds the gate at the token's slot of its expert.
    np.testing.assert_allclose(
        np.asarray(r.combine_weights).sum(-1),
        np.sum(np.eye(4)[order] * np.take_along_axis(probs, order, -1)[..., None], axis=2),
        rtol=1e-6,
    )
    np.testing.assert_allclose(r.router_probs, probs, rtol=1e-6)


def test_softmax_topk_renormalises():
    logits = random_logits((2, 8, 6))
    r = route(logits, num_selected=3, capacity=16, gate_normalization="softmax_topk")
    top = -np.sort(-np.asarray(logits), axis=-1)[..., :3]
    np.testing.assert_allclose(r.gates, np_softmax(top), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(r.gates).sum(-1), 1.0, rtol=1e-6)


def test_unknown_gate_normalization_and_bad_k():
    logits = random_logits((1, 4, 4))
    with pytest.raises(ValueError, match="Unknown gate_normalization"):
        route(logits, num_selected=1, capacity=4, gate_normalization="bogus")
    with pytest.raises(ValueError, match="num_selected must be in"):
        route(logits, num_selected=5, capacity=4)


# --------------------------------------------------------------------------------------------
# Traced k
# --------------------------------------------------------------------------------------------


def test_traced_active_k_masks_ranks_without_recompiling():
    logits = random_logits((2, 8, 6))
    traces = []

    @jax.jit
    def route_k(logits, k):
        traces.append(1)
        return route(
            logits, num_selected=4, capacity=6, active_k=k, gate_normalization="softmax_topk"
        )

    top = -np.sort(-np.asarray(logits), axis=-1)
    for k in (1, 2, 3, 4):
        r = route_k(logits, jnp.int32(k))
        np.testing.assert_array_equal(r.active[..., :k], True)
        np.testing.assert_array_equal(r.active[..., k:], False)
        np.testing.assert_array_equal(r.gates[..., k:], 0.0)
        np.testing.assert_allclose(r.gates[..., :k], np_softmax(top[..., :k]), rtol=1e-6)
        # Same dispatch as routing with k choices from the start.
        ref = route(logits, num_selected=k, capacity=6, gate_normalization="softmax_topk")
        np.testing.assert_array_equal(r.dispatch_mask, ref.dispatch_mask)
        np.testing.assert_allclose(r.combine_weights, ref.combine_weights, rtol=1e-6)
    assert len(traces) == 1


def test_active_k_is_clipped_to_at_least_one():
    logits = random_logits((1, 6, 4))

    def gate_sum(logits, k):
        r = route(logits, num_selected=2, capacity=6, active_k=k, gate_normalization="softmax_topk")
        return jnp.sum(r.combine_weights), r

    (total, r0), grad = jax.value_and_grad(gate_sum, has_aux=True)(logits, jnp.int32(0))
    r1 = route(logits, num_selected=2, capacity=6, active_k=1)
    np.testing.assert_array_equal(r0.active, r1.active)
    np.testing.assert_allclose(total, 6.0, rtol=1e-6)  # one choice per token, gate 1
    assert np.all(np.isfinite(grad))


def test_slot_of_each_kept_choice():
    logits = logits_from_choices([[[0, 1], [0, 1], [0, 1], [1, 0]]], 2)
    r = route(logits, num_selected=2, capacity=2)
    for (g, s), placed in slots(r).items():
        for e, c in placed:
            (k,) = np.nonzero(np.asarray(r.expert_index[g, s]) == e)[0]
            assert r.kept[g, s, k] and int(r.slot[g, s, k]) == c


# --------------------------------------------------------------------------------------------
# Aux losses and metrics against numpy
# --------------------------------------------------------------------------------------------


def np_load_balance(logits, mask, k):
    """E * sum_e f_e P_e per group (real tokens only), averaged over groups."""
    logits = np.asarray(logits, np.float64)
    num_experts = logits.shape[-1]
    probs = np_softmax(logits)
    top = np.argsort(-logits, axis=-1)[..., :k]
    losses = []
    for g in range(logits.shape[0]):
        real = np.asarray(mask[g]) > 0
        chose = np.zeros(num_experts)
        for s in np.nonzero(real)[0]:
            for e in set(top[g, s]):
                chose[e] += 1
        frac = chose / real.sum()
        mean_prob = probs[g][real].mean(0)
        losses.append(num_experts * np.sum(frac * mean_prob))
    return np.mean(losses)


def np_z_loss(logits, mask):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(logits), axis=-1))
    real = np.asarray(mask) > 0
    return np.mean(lse[real] ** 2)


@pytest.mark.parametrize("k", [1, 2])
def test_aux_losses_match_formulas(k):
    logits = random_logits((3, 10, 5), seed=k)
    mask = np.ones((3, 10), np.float32)
    mask[1, 6:] = 0
    mask[2, :3] = 0
    r = route(logits, num_selected=k, capacity=4, padding_mask=jnp.asarray(mask))
    np.testing.assert_allclose(load_balancing_loss(r), np_load_balance(logits, mask, k), rtol=1e-5)
    np.testing.assert_allclose(router_z_loss(r), np_z_loss(logits, mask), rtol=1e-5)


def test_load_balance_loss_is_one_when_balanced():
    # Near-uniform probabilities and an even top-1 assignment: E * sum_e (1/E) (1/E) = 1.
    logits = jnp.zeros((1, 8, 4)).at[0, jnp.arange(8), jnp.arange(8) % 4].set(1e-3)
    r = route(logits, num_selected=1, capacity=8)
    np.testing.assert_allclose(load_balancing_loss(r), 1.0, rtol=1e-3)


def test_aux_losses_ignore_padding_content():
    logits = random_logits((2, 8, 4))
    mask = jnp.array([[1] * 5 + [0] * 3, [1] * 8])
    changed = logits.at[0, 5:].set(100.0)
    a = route(logits, num_selected=2, capacity=8, padding_mask=mask)
    b = route(changed, num_selected=2, capacity=8, padding_mask=mask)
    np.testing.assert_allclose(load_balancing_loss(a), load_balancing_loss(b))
    np.testing.assert_allclose(router_z_loss(a), router_z_loss(b))
    for key, value in routing_metrics(a).items():
        np.testing.assert_allclose(value, routing_metrics(b)[key], err_msg=key)


def test_fully_padded_group_does_not_dilute_load_balance():
    logits = random_logits((2, 8, 4))
    mask = jnp.array([[1] * 8, [0] * 8])
    r = route(logits, num_selected=1, capacity=8, padding_mask=mask)
    only = route(logits[:1], num_selected=1, capacity=8)
    np.testing.assert_allclose(load_balancing_loss(r), load_balancing_loss(only), rtol=1e-6)


def test_aux_loss_gradients_flow_to_logits():
    logits = random_logits((2, 8, 4))

    def total(logits):
        r = route(logits, num_selected=1, capacity=2)
        return load_balancing_loss(r) + router_z_loss(r)

    grad = jax.grad(total)(logits)
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


def test_metrics_match_formulas():
    logits = random_logits((2, 12, 4), seed=3)
    mask = np.ones((2, 12), np.float32)
    mask[1, 9:] = 0
    r = route(logits, num_selected=2, capacity=3, padding_mask=jnp.asarray(mask))
    m = routing_metrics(r)
    real = mask > 0
    probs = np_softmax(logits)
    top = np.argsort(-np.asarray(logits), axis=-1)[..., :2][real]  # [n, 2]
    counts = np.bincount(top.ravel(), minlength=4)
    np.testing.assert_allclose(m["expert_load"], counts / counts.sum(), rtol=1e-6)
    np.testing.assert_allclose(np.sum(m["expert_load"]), 1.0, rtol=1e-6)
    kept = np.asarray(r.kept)[real]
    np.testing.assert_allclose(m["dropped_fraction"], 1.0 - kept.mean(), rtol=1e-6)
    assert 0 < float(m["dropped_fraction"]) < 1  # capacity 3 < 2 * 12 / 4 drops some
    entropy = -np.sum(probs * np.log(probs), axis=-1)[real].mean()
    np.testing.assert_allclose(m["router_entropy"], entropy, rtol=1e-5)
    np.testing.assert_allclose(m["router_confidence"], probs.max(-1)[real].mean(), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Router module
# --------------------------------------------------------------------------------------------


def test_jitter_only_when_not_deterministic():
    # An identity kernel makes logits = jittered inputs, so the jitter range is visible.
    d = num_experts = 6
    router = routers.Router(num_experts, routers.RouterConfig(jitter_noise=0.1))
    x = jnp.asarray(np.random.default_rng(0).uniform(1.0, 2.0, (2, 16, d)).astype(np.float32))
    params = {"params": {"kernel": jnp.eye(d)}}
    np.testing.assert_array_equal(router.apply(params, x, deterministic=True), x)
    noisy = router.apply(params, x, deterministic=False, rngs={routers.JITTER: jax.random.key(0)})
    ratio = np.asarray(noisy / x)
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6
    assert ratio.std() > 0.01
    again = router.apply(params, x, deterministic=False, rngs={routers.JITTER: jax.random.key(0)})
    np.testing.assert_array_equal(noisy, again)
    with pytest.raises(Exception, match="jitter"):
        router.apply(params, x, deterministic=False)
    # Without jitter_noise training needs no rng and changes nothing.
    plain = routers.Router(num_experts)
    np.testing.assert_array_equal(plain.apply(params, x, deterministic=False), x)


def test_router_param_partitioning_and_float32():
    router = routers.Router(4, routers.RouterConfig(use_bias=True))
    x = jnp.ones((2, 3, 8), jnp.bfloat16)
    variables = router.init(jax.random.key(0), x)
    specs = nn.get_partition_spec(variables)["params"]
    assert tuple(specs["kernel"]) == ("embed", "unmodeled")
    assert tuple(specs["bias"]) == ("unmodeled",)
    assert router.apply(variables, x).dtype == jnp.float32


def test_frozen_random_router_lives_outside_params():
    router = routers.Router(4, routers.RouterConfig(kind="frozen_random"))
    x = jnp.ones((2, 3, 8))
    variables = router.init(jax.random.key(0), x)
    assert "params" not in variables
    kernel = variables[routers.FROZEN]["kernel"]
    assert kernel.shape == (8, 4)
    np.testing.assert_allclose(np.std(kernel), 0.02, rtol=0.5)
    np.testing.assert_allclose(router.apply(variables, x), x @ kernel, rtol=1e-6)


def test_hyper_router_generates_weights_and_only_embedding_trains():
    d, num_experts, hidden = 8, 4, 16
    router = routers.Router(num_experts,
                            routers.RouterConfig(kind="hyper", hyper_hidden_dim=hidden))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, d)).astype(np.float32))
    variables = jax.jit(router.init)(jax.random.key(0), x)
    params = nn.unbox(variables["params"])
    frozen = variables[routers.FROZEN]["hyper"]
    r = np.asarray(params["hyper"]["embedding"], np.float64)
    assert r.shape == (d,)  # d_r = d_model by default
    h = np.maximum(r @ frozen["l1_kernel"] + frozen["l1_bias"], 0.0)
    flat = (h @ frozen["l2_kernel"] + frozen["l2_bias"]).reshape(num_experts, d + 1)
    expected = np.asarray(x, np.float64) @ flat[:, :d].T + flat[:, d]
    np.testing.assert_allclose(jax.jit(router.apply)(variables, x), expected, rtol=1e-4, atol=1e-6)

    def loss(params, frozen):
        return jnp.sum(router.apply({"params": params, routers.FROZEN: frozen}, x) ** 2)

    g_params, g_frozen = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, variables[routers.FROZEN])
    assert float(jnp.abs(g_params["hyper"]["embedding"]).max()) > 0
    assert all(float(jnp.abs(v).max()) == 0 for v in jax.tree.leaves(g_frozen))


def test_unknown_router_kind():
    with pytest.raises(ValueError, match="Unknown router kind"):
        routers.RouterConfig(kind="bogus")


def test_linear_k_schedule():
    ks = [int(routing.linear_k_schedule(t, 100, 8, 16)) for t in (0, 25, 50, 100, 200)]
    assert ks == [8, 10, 12, 16, 16]
    with pytest.raises(ValueError, match="total_steps must be positive"):
        routing.linear_k_schedule(0, 0, 1, 2)
