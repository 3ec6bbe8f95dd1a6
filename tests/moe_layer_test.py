"""MoeLayer: single device and expert-parallel meshes against a naive loop-over-experts reference.

The reference (``naive_route`` + ``naive_moe``) is written from the definition, independently of
``routing.route_tokens``: a Python loop walks the tokens of each group in priority order (all rank-0
choices by position, then all rank-1 choices, ...) and hands out expert slots until each expert is
full; then each expert's MLP runs on its kept tokens with its own weights, scaled by the gate.
The routing decisions are piecewise constant, so ``naive_moe`` is differentiable in the weights and
the input through the expert MLPs and the gates.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import all_eqns

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import moe_layer
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig

MESH_SHAPES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
RTOL = ATOL = 1e-5

# Shapes of the equivalence tests: 8 groups of 16 tokens (divides over 8 devices), 8 experts.
BATCH, LENGTH, D_MODEL, HIDDEN, NUM_EXPERTS, GROUP = 4, 32, 16, 32, 8, 16
LOW_CF = 0.5  # top-1: C = max(1, round(0.5 * 16 / 8)) = 1 slot per expert per group

# Each variant runs with one dispatch implementation; together they cover both with top-1, top-2,
# the fused adapters and both dropped-token behaviours. All use padding and drop tokens.
VARIANTS = {
    "top1_relu_scale_input": dict(
        num_selected=1, activation="relu", dropped_token_behavior="scale_input"
    ),
    "top2_gated_gelu": dict(num_selected=2, activation="gated-gelu"),
    "top2_gelu_topk_bpr_gather": dict(
        num_selected=2,
        activation="gelu",
        gate_normalization="softmax_topk",
        batch_prioritized_routing=True,
        dispatch_impl="gather",
    ),
    "top1_relu_adapters": dict(num_selected=1, activation="relu", adapters=True),
    "top1_gated_gelu_adapters_gather_scale_input": dict(
        num_selected=1,
        activation="gated-gelu",
        adapters=True,
        dispatch_impl="gather",
        dropped_token_behavior="scale_input",
    ),
}
TOP1 = dict(num_selected=1, activation="relu")

# --------------------------------------------------------------------------------------------
# Naive reference
# --------------------------------------------------------------------------------------------


def _gelu_tanh(v):
    return 0.5 * v * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


def naive_expert(weights, e, v, activation):
    """Expert e on tokens v <[n, d]>, written out per activation."""
    if activation == "relu":
        h = jnp.maximum(v @ weights["wi"][e], 0.0)
    elif activation == "gelu":
        h = _gelu_tanh(v @ weights["wi"][e])
    elif activation == "gated-gelu":
        h = _gelu_tanh(v @ weights["wi_0"][e]) * (v @ weights["wi_1"][e])
    elif activation == "gated-silu":
        a = v @ weights["wi_0"][e]
        h = a / (1.0 + jnp.exp(-a)) * (v @ weights["wi_1"][e])
    else:
        raise ValueError(activation)
    return h @ weights["wo"][e]


def naive_adapter(adapters, e, v):
    h = jnp.maximum(v @ adapters["w_down"][e] + adapters["b_down"][e], 0.0)
    return h @ adapters["w_up"][e] + adapters["b_up"][e]


def naive_route(logits, mask, num_selected, capacity, batch_prioritized=False):
    """Slot assignment by a plain loop.

    Args:
      logits: np [G, S, E]; mask: np [G, S] (1 = real token).

    Returns:
      choice: int [G, S, K] experts in rank order; kept: bool [G, S, K].
    """
    num_groups, group_size, num_experts = logits.shape
    choice = np.zeros((num_groups, group_size, num_selected), np.int64)
    kept = np.zeros((num_groups, group_size, num_selected), bool)
    for g in range(num_groups):
        for s in range(group_size):
            choice[g, s] = sorted(range(num_experts), key=lambda e: -logits[g, s, e])[:num_selected]
        if batch_prioritized:
            top_prob = [max(_softmax(logits[g, s])) for s in range(group_size)]
            order = sorted(range(group_size), key=lambda s: -top_prob[s])
        else:
            order = list(range(group_size))
        used = [0] * num_experts
        for k in range(num_selected):
            for s in order:
                if not mask[g, s]:
                    continue
                e = choice[g, s, k]
                if used[e] < capacity:
                    used[e] += 1
                    kept[g, s, k] = True
    return choice, kept


def _softmax(v):
    v = np.asarray(v, np.float64)
    z = np.exp(v - v.max())
    return z / z.sum()


def naive_moe(params, x, choice, kept, mask, cfg, adapters=None):
    """Loop-over-experts forward with fixed routing decisions; differentiable in params and x."""
    d = x.shape[-1]
    xt = x.reshape(-1, d)
    num_tokens = xt.shape[0]
    choice = choice.reshape(num_tokens, -1)
    kept = kept.reshape(num_tokens, -1)
    mask = mask.reshape(num_tokens)
    logits = xt @ params["router"]["kernel"]
    probs = jax.nn.softmax(logits, axis=-1)
    if cfg.get("gate_normalization", "none") == "softmax_topk":
        gates = jax.nn.softmax(jnp.take_along_axis(logits, jnp.asarray(choice), axis=-1), axis=-1)
    else:
        gates = jnp.take_along_axis(probs, jnp.asarray(choice), axis=-1)  # [T, K]
    y = jnp.zeros_like(xt)
    for e in range(probs.shape[-1]):
        for k in range(choice.shape[-1]):
            (tokens,) = np.nonzero((choice[:, k] == e) & kept[:, k] & (mask > 0))
            if not len(tokens):
                continue
            out = naive_expert(params["experts"], e, xt[tokens], cfg["activation"])
            y = y.at[tokens].add(gates[tokens, k][:, None] * out)
            if adapters is not None:
                y = y.at[tokens].add(naive_adapter(adapters, e, xt[tokens]))
    if cfg.get("dropped_token_behavior") == "scale_input":
        (dropped,) = np.nonzero(~kept[:, 0] & (mask > 0))
        y = y.at[dropped].add(gates[dropped, 0][:, None] * xt[dropped])
    return y.reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def layer_from(num_experts=NUM_EXPERTS, hidden=HIDDEN, *, num_selected=1, activation="relu",
               expert_dropout_rate=0.0, jitter_noise=0.0, gate_normalization=None,
               batch_prioritized_routing=False, train_capacity_factor=1.25,
               eval_capacity_factor=2.0, min_capacity=4, group_size=None,
               dropped_token_behavior="zero", dispatch_impl="einsum", mesh=None):
    """A ``MoeLayer`` from a test case's description."""
    return moe_layer.MoeLayer(
        experts=ExpertsConfig(num_experts=num_experts, hidden_dim=hidden, activation=activation,
                              dropout_rate=expert_dropout_rate),
        router=RouterConfig(num_selected=num_selected, jitter_noise=jitter_noise,
                            gate_normalization=gate_normalization,
                            batch_prioritized=batch_prioritized_routing),
        dispatch=DispatchConfig(train_capacity_factor=train_capacity_factor,
                                eval_capacity_factor=eval_capacity_factor,
                                min_capacity=min_capacity, group_size=group_size,
                                dropped_token_behavior=dropped_token_behavior,
                                impl=dispatch_impl),
        mesh=mesh,
    )


def make_layer(cfg, mesh=None, **overrides):
    kwargs = dict(
        group_size=GROUP,
        eval_capacity_factor=LOW_CF,
        train_capacity_factor=LOW_CF,
        min_capacity=1,
        mesh=mesh,
    )
    kwargs.update({k: v for k, v in cfg.items() if k != "adapters"})
    kwargs.update(overrides)
    return layer_from(**kwargs)


def make_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH, LENGTH, D_MODEL)).astype(np.float32)
    lengths = [LENGTH, 20, 7, LENGTH - 3]
    mask = (np.arange(LENGTH)[None, :] < np.array(lengths)[:, None]).astype(np.float32)
    cotangent = rng.normal(size=(BATCH, LENGTH, D_MODEL)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(mask), jnp.asarray(cotangent)


def make_adapters(bottleneck=8):
    keys = jax.random.split(jax.random.key(7), 4)
    e, d, b = NUM_EXPERTS, D_MODEL, bottleneck
    return {
        "w_down": jax.random.normal(keys[0], (e, d, b)) * d**-0.5,
        "b_down": jax.random.normal(keys[1], (e, b)) * 0.1,
        "w_up": jax.random.normal(keys[2], (e, b, d)) * b**-0.5,
        "b_up": jax.random.normal(keys[3], (e, d)) * 0.1,
    }


def random_params(module, *args, seed=1):
    """Parameters of ``module`` drawn N(0, 1/fan_in) per leaf; no forward pass is compiled.

    (Larger than the default router init, so that tokens spread over the experts.)
    """
    with part.axis_rules():
        abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[-2] ** -0.5, a.dtype), abstract
    )


def init_params(cfg):
    x, _, _ = make_inputs()
    return random_params(make_layer(cfg), x)


def apply(layer, params, x, rngs=None, **kwargs):
    """Jitted ``layer.apply`` (keyword arguments are static or closed over)."""
    fn = jax.jit(lambda p, x, rngs: layer.apply({"params": p}, x, rngs=rngs, **kwargs))
    return fn(params, x, rngs)


def _layer_loss_fn(layer, use_adapters):
    def loss(params, x, adapters, mask, cotangent):
        y, aux = layer.apply(
            {"params": params}, x, padding_mask=mask, adapters=adapters if use_adapters else None
        )
        return jnp.sum(y * cotangent), (y, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def single_device(name):
    """(y, grads, aux) of the layer without a mesh, and the naive reference (y, grads, kept)."""
    cfg = VARIANTS[name]
    params = init_params(cfg)
    x, mask, cotangent = make_inputs()
    adapters = make_adapters()
    use_adapters = cfg.get("adapters", False)
    with part.axis_rules():
        (_, (y, aux)), grads = _layer_loss_fn(make_layer(cfg), use_adapters)(
            params, x, adapters, mask, cotangent
        )

    k = cfg["num_selected"]
    capacity = max(1, round(LOW_CF * k * GROUP / NUM_EXPERTS))
    x_np = np.asarray(x).reshape(-1, GROUP, D_MODEL)
    logits = np.asarray(jnp.einsum("gsd,de->gse", x_np, params["router"]["kernel"]))
    mask_np = np.asarray(mask).reshape(-1, GROUP)
    choice, kept = naive_route(
        logits, mask_np, k, capacity, cfg.get("batch_prioritized_routing", False)
    )

    def naive_loss(params, x, adapters):
        y = naive_moe(params, x, choice, kept, mask_np, cfg, adapters if use_adapters else None)
        return jnp.sum(y * cotangent), y

    naive_fn = jax.jit(jax.value_and_grad(naive_loss, argnums=(0, 1, 2), has_aux=True))
    (_, y_ref), grads_ref = naive_fn(params, x, adapters)
    return params, (y, grads, aux), (y_ref, grads_ref, choice, kept)


def assert_trees_close(actual, expected, rtol=RTOL, atol=ATOL):
    flat_a, tree_a = jax.tree.flatten(actual)
    flat_e, tree_e = jax.tree.flatten(expected)
    assert tree_a == tree_e
    for a, e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# Equivalence: single device vs naive reference, meshes vs both
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_single_device_matches_naive_reference(name):
    cfg = VARIANTS[name]
    _, (y, grads, aux), (y_ref, grads_ref, choice, kept) = single_device(name)
    _, mask, _ = make_inputs()
    # The low capacity factor really drops tokens, and the layer drops exactly the naive ones.
    assert not kept[np.asarray(mask).reshape(-1, GROUP) > 0].all()
    assert float(aux.metrics["dropped_fraction"]) > 0.1
    np.testing.assert_array_equal(np.asarray(aux.kept).reshape(kept.shape), kept)
    np.testing.assert_array_equal(np.asarray(aux.expert_index).reshape(choice.shape), choice)
    assert_trees_close(y, y_ref)
    assert_trees_close(grads, grads_ref)
    # Gradients are not trivially zero.
    assert float(jnp.abs(grads[0]["router"]["kernel"]).max()) > 1e-3
    if cfg.get("adapters"):
        assert float(jnp.abs(grads[2]["w_down"]).max()) > 1e-3


@pytest.mark.parametrize("shape", MESH_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mesh_matches_single_device_and_naive(name, shape):
    cfg = VARIANTS[name]
    params, (y1, grads1, aux1), (y_ref, grads_ref, _, _) = single_device(name)
    x, mask, cotangent = make_inputs()
    adapters = make_adapters()
    mesh = part.make_mesh(*shape)
    layer = make_layer(cfg, mesh)
    with part.axis_rules(mesh):
        # Place the parameters as training would: experts split over `expert` (and `model`).
        abstract = jax.eval_shape(lambda: make_layer(cfg).init(jax.random.key(1), x))
        shardings = part.params_shardings(mesh, abstract)["params"]
        params = jax.device_put(params, shardings)
        (_, (y, aux)), grads = _layer_loss_fn(layer, cfg.get("adapters", False))(
            params, x, adapters, mask, cotangent
        )
    assert params["experts"]["wo"].sharding.spec[0] == part.EXPERT
    assert_trees_close(y, y1)
    assert_trees_close(grads, grads1)
    assert_trees_close(y, y_ref)
    assert_trees_close(grads, grads_ref)
    np.testing.assert_array_equal(aux.kept, aux1.kept)
    assert_trees_close(
        (aux.load_balance_loss, aux.z_loss, aux.metrics),
        (aux1.load_balance_loss, aux1.z_loss, aux1.metrics),
    )


# --------------------------------------------------------------------------------------------
# Layer behaviour
# --------------------------------------------------------------------------------------------


def _all_to_expert_zero(num_experts, d_model):
    kernel = np.zeros((d_model, num_experts), np.float32)
    kernel[:, 0] = 1.0
    return jnp.asarray(kernel)


def test_train_and_eval_capacity_factors():
    # Every token picks expert 0, so each group keeps exactly C tokens.
    layer = layer_from(4, 8, group_size=16, train_capacity_factor=1.0, eval_capacity_factor=2.0,
                       min_capacity=1)
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 16, 8))) + 0.1
    params = random_params(layer, x)
    params["router"]["kernel"] = _all_to_expert_zero(4, 8)
    _, aux_eval = apply(layer, params, x, deterministic=True)
    _, aux_train = apply(layer, params, x, deterministic=False)
    # C = max(1, round(cf * 1 * 16 / 4)): 4 in training (cf 1.0), 8 at eval (cf 2.0).
    np.testing.assert_array_equal(np.asarray(aux_train.kept[..., 0]).sum(-1), [4, 4])
    np.testing.assert_array_equal(np.asarray(aux_eval.kept[..., 0]).sum(-1), [8, 8])
    # The first C positions are the kept ones.
    np.testing.assert_array_equal(aux_train.kept[0, :, 0], np.arange(16) < 4)
    np.testing.assert_allclose(aux_train.metrics["dropped_fraction"], 12 / 16)
    np.testing.assert_allclose(aux_eval.metrics["dropped_fraction"], 8 / 16)


def test_dropped_tokens_zero_vs_scale_input():
    kwargs = dict(num_experts=4, hidden=8, group_size=8, min_capacity=1)
    x = jnp.abs(jax.random.normal(jax.random.key(0), (1, 8, 8))) + 0.1
    zero = layer_from(**kwargs, eval_capacity_factor=1.0)  # C = 2
    scale = layer_from(**kwargs, eval_capacity_factor=1.0, dropped_token_behavior="scale_input")
    params = random_params(zero, x)
    params["router"]["kernel"] = _all_to_expert_zero(4, 8)
    y0, aux = apply(zero, params, x)
    y1, _ = apply(scale, params, x)
    kept = np.asarray(aux.kept[0, :, 0])
    np.testing.assert_array_equal(kept, np.arange(8) < 2)
    np.testing.assert_array_equal(y0[0, ~kept], 0.0)
    probs = jax.nn.softmax(x[0] @ params["router"]["kernel"], axis=-1)
    np.testing.assert_allclose(y1[0, ~kept], probs[~kept, :1] * x[0, ~kept], rtol=1e-6)
    np.testing.assert_allclose(y1[0, kept], y0[0, kept], rtol=1e-6)


def test_padding_is_not_dispatched_and_output_zero():
    layer = make_layer(TOP1, eval_capacity_factor=2.0)
    params = init_params(TOP1)
    x, mask, _ = make_inputs()
    masked = jax.jit(lambda p, x: layer.apply({"params": p}, x, padding_mask=mask))
    y, aux = masked(params, x)
    pad = np.asarray(mask) == 0
    np.testing.assert_array_equal(np.asarray(y)[pad], 0.0)
    assert not np.asarray(aux.kept)[pad].any()
    # Padding content does not influence real tokens or the aux losses.
    x2 = jnp.where(mask[..., None] > 0, x, 100.0 * jnp.ones_like(x))
    y2, aux2 = masked(params, x2)
    np.testing.assert_allclose(np.asarray(y2)[~pad], np.asarray(y)[~pad], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux2.load_balance_loss, aux.load_balance_loss, rtol=1e-6)
    np.testing.assert_allclose(aux2.z_loss, aux.z_loss, rtol=1e-6)


def _collective_operands(fn, *args):
    """Shapes of the first operand of every all_to_all / all_gather / psum_scatter / psum in the
    jaxpr of ``fn`` (inside shard_map bodies too)."""
    names = ("all_to_all", "all_gather", "reduce_scatter", "psum", "psum_invariant")
    return [(eqn.primitive.name, tuple(eqn.invars[0].aval.shape))
            for eqn in all_eqns(jax.make_jaxpr(fn)(*args)) if eqn.primitive.name in names]


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)], ids=lambda s: "x".join(map(str, s)))
def test_model_axis_does_not_repeat_the_all_to_all(shape):
    """With a model axis the groups are split over it too: each device sends only its own groups
    over `expert` (none repeats another model shard's exchange), gathers them over `model` for
    its slice of f, and reduce-scatters the partial outputs back."""
    params = init_params(TOP1)
    x, _, _ = make_inputs()
    mesh = part.make_mesh(*shape)
    layer = make_layer(TOP1, mesh)
    with part.axis_rules(mesh):
        ops = _collective_operands(lambda p, x: layer.apply({"params": p}, x)[0], params, x)
    groups_per_device = (BATCH * LENGTH // GROUP) // 8  # every mesh axis splits the groups
    capacity = max(1, round(LOW_CF * GROUP / NUM_EXPERTS))
    # Each all_to_all (there and back) moves this device's own groups: E * G_l * C * d values,
    # G_l = G / (data * expert * model) (replicated over model it would be model times more).
    exchanged = [math.prod(s) for name, s in ops if name == "all_to_all"]
    assert len(exchanged) == 2, ops
    assert exchanged == [NUM_EXPERTS * groups_per_device * capacity * D_MODEL] * 2, ops
    assert ("all_gather", (NUM_EXPERTS // shape[1], shape[1] * groups_per_device, capacity,
                           D_MODEL)) in ops
    names = {name for name, _ in ops}
    assert "reduce_scatter" in names and not names & {"psum", "psum_invariant"}, ops


def test_groups_that_do_not_divide_over_model_fall_back_to_replicated():
    """4 groups on a (1, 4, 2) mesh: split over expert only, replicated over model (psum)."""
    params = init_params(TOP1)
    x, mask, _ = make_inputs()
    mesh = part.make_mesh(1, 4, 2)
    layer = make_layer(TOP1, mesh, group_size=LENGTH)  # 4 groups of 32
    with part.axis_rules():
        y1, _ = apply(make_layer(TOP1, group_size=LENGTH), params, x, padding_mask=mask)
    with part.axis_rules(mesh):
        y, _ = apply(layer, params, x, padding_mask=mask)
        ops = _collective_operands(lambda p, x: layer.apply({"params": p}, x)[0], params, x)
    assert_trees_close(y, y1)
    names = {name for name, _ in ops}
    assert names & {"psum", "psum_invariant"} and "reduce_scatter" not in names, ops


def test_static_active_k_routes_with_k_experts():
    """A Python-int k sizes top-k and capacity for k (evaluating at k costs what k costs) and
    equals a layer built for k, from the same parameters."""
    cfg = dict(num_selected=4, activation="relu", gate_normalization="softmax_topk")
    layer = make_layer(cfg, eval_capacity_factor=1.0)
    params = init_params(cfg)
    x, mask, _ = make_inputs()
    for k in (1, 2, 4):
        y, aux = apply(layer, params, x, padding_mask=mask, active_k=k)
        ref = make_layer(dict(cfg, num_selected=k), eval_capacity_factor=1.0)
        y_ref, aux_ref = apply(ref, params, x, padding_mask=mask)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
        assert aux.expert_index.shape[-1] == k
        np.testing.assert_array_equal(aux.kept, aux_ref.kept)
        # The experts run on k * S / E slots per group, not on num_selected's.
        capacity = max(1, round(1.0 * k * GROUP / NUM_EXPERTS))
        jaxpr = jax.make_jaxpr(lambda p, x, k=k: layer.apply({"params": p}, x, active_k=k))(
            params, x)
        shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
        assert (NUM_EXPERTS, BATCH * LENGTH // GROUP, capacity, HIDDEN) in shapes, k


def test_traced_active_k_does_not_recompile():
    layer = make_layer(
        dict(num_selected=4, activation="relu", gate_normalization="softmax_topk"),
        eval_capacity_factor=4.0,
    )
    params = init_params(dict(num_selected=4, activation="relu"))
    x, _, _ = make_inputs()
    traces = []

    @jax.jit
    def f(params, x, k):
        traces.append(1)
        return layer.apply({"params": params}, x, active_k=k)

    outs = {k: f(params, x, jnp.int32(k)) for k in (1, 2, 3, 4)}
    assert len(traces) == 1
    for k, (_, aux) in outs.items():
        # Only the first k choices of every token are in play.
        np.testing.assert_allclose(aux.metrics["expert_load"].sum(), 1.0, rtol=1e-6)
        ref = make_layer(
            dict(num_selected=k, activation="relu", gate_normalization="softmax_topk"),
            eval_capacity_factor=4.0 * 4 / k,  # the same capacity as the K=4 layer
        )
        y_ref, aux_ref = apply(ref, params, x)
        np.testing.assert_allclose(outs[k][0], y_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(aux.kept[..., :k], aux_ref.kept)
        assert not np.asarray(aux.kept[..., k:]).any()


def test_jitter_only_in_training():
    layer = make_layer(TOP1, jitter_noise=0.5)
    params = init_params(TOP1)
    x, _, _ = make_inputs()
    plain = make_layer(TOP1)
    y_plain, _ = apply(plain, params, x, deterministic=False)
    y_eval, _ = apply(layer, params, x, deterministic=True)  # no rng needed
    np.testing.assert_allclose(y_eval, y_plain, rtol=1e-6, atol=1e-7)
    train = jax.jit(
        lambda p, x, rngs: layer.apply({"params": p}, x, deterministic=False, rngs=rngs)
    )
    y_a, _ = train(params, x, {"jitter": jax.random.key(0)})
    y_b, _ = train(params, x, {"jitter": jax.random.key(1)})
    assert not np.allclose(y_a, y_plain)
    assert not np.allclose(y_a, y_b)
    with pytest.raises(Exception, match="jitter"):
        jax.eval_shape(lambda p, x: layer.apply({"params": p}, x, deterministic=False), params, x)


def test_expert_dropout_only_in_training():
    layer = make_layer(TOP1, expert_dropout_rate=0.5)
    plain = make_layer(TOP1)
    params = init_params(TOP1)
    x, _, _ = make_inputs()
    y_plain, _ = apply(plain, params, x, deterministic=False)
    y_eval, _ = apply(layer, params, x, deterministic=True)  # no rng needed
    np.testing.assert_allclose(y_eval, y_plain, rtol=1e-6, atol=1e-7)
    y, _ = apply(layer, params, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
    assert not np.allclose(y, y_plain)


def test_aux_outputs_and_scan():
    """MoeAux comes back as a value, so stacked layers under nn.scan return per-layer aux."""
    cfg = dict(num_selected=2, activation="relu")

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            def body(mdl, carry, _):
                y, aux = make_layer(cfg)(carry)
                return carry + y, aux

            scan = nn.scan(
                body,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=3,
                metadata_params={nn.PARTITION_NAME: part.LAYERS},
            )
            return scan(self, x, None)

    x, _, _ = make_inputs()
    params = random_params(Stack(), x)
    assert params["MoeLayer_0"]["experts"]["wo"].shape[0] == 3
    with part.axis_rules():
        y, aux = apply(Stack(), params, x)
    assert y.shape == x.shape
    assert aux.load_balance_loss.shape == (3,)
    assert aux.z_loss.shape == (3,)
    assert aux.metrics["expert_load"].shape == (3, NUM_EXPERTS)
    assert aux.expert_index.shape == (3, BATCH, LENGTH, 2)
    assert aux.kept.dtype == jnp.bool_
    np.testing.assert_allclose(aux.metrics["expert_load"].sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(aux.load_balance_loss) > 0)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_error_experts_not_divisible_by_expert_axis():
    mesh = part.make_mesh(2, 4, 1)
    layer = layer_from(6, 8, group_size=8, mesh=mesh)
    with part.axis_rules(mesh), pytest.raises(ValueError, match="num_experts=6 is not divisible"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((8, 8, 4)))


def test_error_tokens_do_not_divide_into_groups():
    layer = layer_from(4, 8, group_size=6)
    with pytest.raises(ValueError, match="do not divide into groups of group_size=6"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((2, 8, 4)))


def test_error_groups_do_not_divide_over_devices():
    mesh = part.make_mesh(2, 4, 1)
    layer = layer_from(8, 8, group_size=8, mesh=mesh)
    with part.axis_rules(mesh), pytest.raises(ValueError, match="cannot be split over data"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((2, 8, 4)))  # 2 groups, 8 shards


@pytest.mark.parametrize("field", ["train_capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [0.0, -1.0])
def test_error_non_positive_capacity_factor(field, value):
    with pytest.raises(ValueError, match=f"DispatchConfig.{field} must be positive"):
        layer_from(4, 8, **{field: value})


def test_error_adapters_need_top1_and_bad_options():
    x = jnp.ones((2, 8, 4))
    layer = layer_from(4, 8, num_selected=2)
    params = random_params(layer, x)
    adapters = {
        "w_down": jnp.zeros((4, 4, 2)),
        "b_down": jnp.zeros((4, 2)),
        "w_up": jnp.zeros((4, 2, 4)),
        "b_up": jnp.zeros((4, 4)),
    }
    with pytest.raises(ValueError, match="top-1 routing only"):
        jax.eval_shape(lambda p: layer.apply({"params": p}, x, adapters=adapters), params)
    with pytest.raises(ValueError, match="dropped_token_behavior must be"):
        layer_from(4, 8, dropped_token_behavior="drop")
    with pytest.raises(ValueError, match=r"DispatchConfig.impl must be 'auto' .* or one of"):
        layer_from(4, 8, dispatch_impl="scatter")
