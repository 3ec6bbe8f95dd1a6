"""The variant switch: HyperRouter, SMoE-Dropout, MoE-Share, and every variant on 8 devices.

References are computed here in numpy from the parameter values (float64), independently of the
library code: the HyperRouter router ``reshape(L2 relu(L1 r + c1) + c2, [E, d + 1])``, the top-k
softmax gate over the selected logits, the expert MLPs, MoE-Share's adapter.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import hyper_experts, routers, routing, variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig

B, L, D, F, E = 8, 8, 8, 16, 8


def sparse_mlp(variant, *, num_experts=E, num_selected=1, eval_capacity_factor=2.0,
               min_capacity=4, placement="dense", dispatch_impl="einsum", adapter_dim=64,
               mesh=None):
    """A ``SparseMlp`` of ``variant`` with expert hidden size F."""
    return variants.SparseMlp(variants.moe_config(
        variant,
        experts=ExpertsConfig(num_experts=num_experts, hidden_dim=F),
        router=RouterConfig(num_selected=num_selected),
        dispatch=DispatchConfig(eval_capacity_factor=eval_capacity_factor,
                                min_capacity=min_capacity, impl=dispatch_impl),
        hyper_experts=HyperExpertsConfig(placement=placement),
        shared_adapter=variants.SharedAdapterConfig(bottleneck_dim=adapter_dim),
    ), mesh=mesh)


def random_values(abstract, seed):
    """Random O(1) values for a (boxed) variable tree from ``jax.eval_shape``."""
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "embedding" in name:
            std = 1.0
        elif "bias" in name or name.endswith("_b1']") or name.endswith("_b2']") or len(shape) < 2:
            std = 0.1
        elif "hypernet" in name and len(shape) == 3:
            std = 1.0 / math.sqrt(shape[0] * shape[1])
        else:
            std = 1.0 / math.sqrt(shape[-2])
        return jnp.asarray(rng.normal(0.0, std, shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, nn.meta.unbox(abstract))


def np_relu(v):
    return np.maximum(v, 0.0)


def np_topk_moe(x, logits, wi, wo, k):
    """sum_{j in top-k} softmax(top-k logits)_j * relu(x wi_j) wo_j, per token (no capacity)."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    logits = np.asarray(logits, np.float64).reshape(x.shape[0], -1)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-logits[t], kind="stable")[:k]
        g = np.exp(logits[t, top] - logits[t, top].max())
        g /= g.sum()
        for j, e in enumerate(top):
            out[t] += g[j] * (np_relu(x[t] @ wi[e]) @ wo[e])
    return out


def np_hyper_router(router_vars, num_experts):
    """HyperRouter weights from its parameters: reshape(H(r), [E, d + 1])."""
    hp = {k: np.asarray(v, np.float64) for k, v in router_vars["params"]["hyper"].items()}
    fz = {k: np.asarray(v, np.float64) for k, v in router_vars[routers.FROZEN]["hyper"].items()}
    h = np_relu(hp["embedding"] @ fz["l1_kernel"] + fz["l1_bias"])
    flat = (h @ fz["l2_kernel"] + fz["l2_bias"]).reshape(num_experts, -1)
    return flat[:, :-1], flat[:, -1]


def router_vars(variables, path=("moe", "router")):
    out = {}
    for col in variables:
        v = variables[col]
        for p in path:
            v = v[p]
        out[col] = v
    return out


# --------------------------------------------------------------------------------------------
# HyperRouter
# --------------------------------------------------------------------------------------------


def test_hyper_router_generates_reshape_of_frozen_hypernetwork():
    layer = sparse_mlp("hyperrouter", num_experts=4, num_selected=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 32))
    variables = jax.jit(layer.init)(jax.random.PRNGKey(1), x)
    variables = nn.meta.unbox(variables)
    assert set(variables) == {"params", routers.FROZEN}
    r = router_vars(variables)
    assert set(r["params"]["hyper"]) == {"embedding"}
    assert set(r[routers.FROZEN]["hyper"]) == {"l1_kernel", "l1_bias", "l2_kernel", "l2_bias"}
    fz = r[routers.FROZEN]["hyper"]
    assert fz["l1_kernel"].shape == (32, 256) and fz["l2_kernel"].shape == (256, 4 * 33)
    for name in ("l1_kernel", "l2_kernel"):
        assert abs(float(np.std(fz[name])) - 0.02) < 0.002, name
    assert not np.asarray(fz["l1_bias"]).any() and not np.asarray(fz["l2_bias"]).any()
    assert r["params"]["hyper"]["embedding"].shape == (32,)

    # Router logits == x W^T + b with [W | b] = reshape(H(r)), computed in numpy.
    w, b = np_hyper_router(r, 4)
    logits = routers.Router(4, RouterConfig(kind="hyper")).apply(r, x)
    np.testing.assert_allclose(logits, np.asarray(x, np.float64) @ w.T + b, rtol=1e-5, atol=1e-5)


def test_hyper_router_optimizer_step_trains_only_the_embedding():
    layer = sparse_mlp("hyperrouter", num_experts=4, num_selected=2)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, D))
    variables = random_values(jax.eval_shape(layer.init, jax.random.PRNGKey(1), x), 2)
    params, frozen = variables["params"], variables[routers.FROZEN]
    frozen_before = jax.tree.map(np.array, frozen)
    tx = optax.adamw(1e-2, weight_decay=0.1)  # only `params` are handed to the optimizer
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, frozen, x):
        def loss_fn(params):
            y, aux = layer.apply({"params": params, routers.FROZEN: frozen}, x,
                                 deterministic=False)
            return jnp.mean(y**2) + 0.01 * aux.load_balance_loss

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, grads

    new_params, _, grads = train_step(params, opt_state, frozen, x)
    emb0 = params["moe"]["router"]["hyper"]["embedding"]
    emb1 = new_params["moe"]["router"]["hyper"]["embedding"]
    assert np.abs(np.asarray(grads["moe"]["router"]["hyper"]["embedding"])).max() > 0
    assert np.abs(np.asarray(emb1 - emb0)).max() > 1e-4
    # The frozen hypernetwork is bit-identical (and was never an optimizer input).
    jax.tree.map(np.testing.assert_array_equal, frozen, frozen_before)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(opt_state)[0]]
    assert opt_paths and not any("l1_" in p or "l2_" in p for p in opt_paths)
    # The generated router moved with the embedding.
    w0, _ = np_hyper_router(router_vars({"params": params, routers.FROZEN: frozen}), 4)
    w1, _ = np_hyper_router(router_vars({"params": new_params, routers.FROZEN: frozen}), 4)
    assert np.abs(w1 - w0).max() > 0


# --------------------------------------------------------------------------------------------
# SMoE-Dropout (and HyperRouter with the same k schedule)
# --------------------------------------------------------------------------------------------


def test_linear_k_schedule_matches_the_formula():
    total, k_min, k_max = 100, 2, 8
    steps = [0, 1, 8, 9, 25, 50, 58, 75, 91, 99, 100, 150]
    got = [int(routing.linear_k_schedule(s, total, k_min, k_max)) for s in steps]
    # round((k_max - k_min) * t / T) + k_min with Python's round-half-to-even, clipped at k_max.
    want = [min(k_max, round((k_max - k_min) * s / total) + k_min) for s in steps]
    assert got == want == [2, 2, 2, 3, 4, 5, 5, 6, 7, 8, 8, 8]
    # The official run: 8 -> 16 of 16 experts.
    assert [int(routing.linear_k_schedule(s, 1000, 8, 16)) for s in (0, 62, 63, 500, 1000)] == [
        8, 8, 9, 12, 16
    ]


@pytest.mark.parametrize("variant", ["smoe_dropout", "hyperrouter"])
def test_any_k_at_eval_from_one_set_of_params_without_recompiling(variant):
    layer = sparse_mlp(variant, num_selected=E,
                       eval_capacity_factor=1.0)  # C = S: nothing dropped at any k
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, D))
    abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(1), x)
    variables = random_values(abstract, 3)
    traces = []

    @jax.jit
    def evaluate(variables, x, k):
        traces.append(k)
        return layer.apply(variables, x, active_k=k)[0]

    if variant == "smoe_dropout":
        kernel = np.asarray(variables[routers.FROZEN]["moe"]["router"]["kernel"], np.float64)
        logits = np.asarray(x, np.float64) @ kernel
    else:
        w, b = np_hyper_router(router_vars(variables), E)
        logits = np.asarray(x, np.float64) @ w.T + b
    experts = variables["params"]["moe"]["experts"]
    wi, wo = np.asarray(experts["wi"], np.float64), np.asarray(experts["wo"], np.float64)

    outs = {}
    for k in (1, 2, 4, 8):
        outs[k] = np.asarray(evaluate(variables, x, jnp.int32(k)))
        ref = np_topk_moe(x, logits, wi, wo, k).reshape(outs[k].shape)
        np.testing.assert_allclose(outs[k], ref, rtol=1e-5, atol=1e-5, err_msg=f"k={k}")
    assert len(traces) == 1, "changing k recompiled"
    for k1, k2 in ((1, 2), (2, 4), (4, 8)):
        assert np.abs(outs[k1] - outs[k2]).max() > 1e-3


def test_smoe_dropout_training_with_the_k_schedule_compiles_once():
    layer = sparse_mlp("smoe_dropout", num_selected=E)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, D))
    variables = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x))
    params, frozen = variables["params"], variables[routers.FROZEN]
    assert "router" not in params["moe"]  # the random router is frozen, not a parameter
    assert frozen["moe"]["router"]["kernel"].shape == (D, E)
    traces = []

    @jax.jit
    def grads_at(params, step):
        traces.append(step)
        k = routing.linear_k_schedule(step, 100, 2, E)

        def loss_fn(params):
            y, _ = layer.apply({"params": params, routers.FROZEN: frozen}, x,
                               deterministic=False, active_k=k)
            return jnp.sum(y**2)

        return jax.grad(loss_fn)(params)

    norms = []
    for step in (0, 50, 100):
        g = grads_at(params, jnp.int32(step))
        norms.append(float(optax.tree.norm(g)))
    assert len(traces) == 1
    assert len(set(norms)) == 3  # k changed the computation


# --------------------------------------------------------------------------------------------
# MoE-Share
# --------------------------------------------------------------------------------------------


def test_moe_share_adds_a_static_adapter_to_the_moe_output():
    share = sparse_mlp("moe_share", num_experts=4, adapter_dim=6)
    switch = sparse_mlp("switch", num_experts=4)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, D))
    init = nn.meta.unbox(jax.jit(share.init)(jax.random.PRNGKey(1), x))
    a = init["params"]["share_adapter"]
    bound = 1e-4 * math.sqrt(6 / (D + 6))  # Xavier-uniform, gain 1e-4
    for name in ("w_down", "w_up"):
        assert 0.8 * bound < np.abs(np.asarray(a[name])).max() <= bound
    assert not np.asarray(a["b_down"]).any() and not np.asarray(a["b_up"]).any()

    variables = random_values(jax.eval_shape(share.init, jax.random.PRNGKey(1), x), 5)
    y = jax.jit(share.apply)(variables, x)[0]
    y_switch = jax.jit(switch.apply)({"params": {"moe": variables["params"]["moe"]}}, x)[0]
    a = {k: np.asarray(v, np.float64) for k, v in variables["params"]["share_adapter"].items()}
    xs = np.asarray(x, np.float64)
    adapter = np_relu(xs @ a["w_down"] + a["b_down"]) @ a["w_up"] + a["b_up"]
    np.testing.assert_allclose(y, np.asarray(y_switch) + adapter, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda p: jnp.sum(share.apply({"params": p}, x)[0] ** 2)))(
        variables["params"])
    assert np.abs(np.asarray(g["share_adapter"]["w_down"])).max() > 0


# --------------------------------------------------------------------------------------------
# Every variant on 8 devices == one device
# --------------------------------------------------------------------------------------------

# name -> (SparseMlp kwargs, generator kwargs or None, active_k or None). All use E = 8 experts
# and cf = 0.5, so tokens are dropped.
MESH_LAYERS = {
    "switch": (dict(variant="switch"), None, None),
    "hypermoe_dense": (dict(variant="hypermoe", placement="dense"), ("top1", 0), None),
    "hypermoe_fused": (dict(variant="hypermoe", placement="fused"), ("top1", 1), None),
    "hypermoe_fused_gather": (dict(variant="hypermoe", placement="fused", dispatch_impl="gather"),
                              ("top1", 1), None),
    "hypermoe_top2": (dict(variant="hypermoe", num_selected=2), ("top2", 0), None),
    "hypermoe_top2_per_token": (dict(variant="hypermoe", num_selected=2), ("per_token", 0), None),
    "hyperrouter": (dict(variant="hyperrouter", num_selected=2), None, 1),
    "smoe_dropout": (dict(variant="smoe_dropout", num_selected=4), None, 2),
    "moe_share": (dict(variant="moe_share", adapter_dim=4), None, None),
}
GENERATORS = {  # one generator per stack; "top1" feeds two layers
    "top1": dict(num_layers=2, num_selected=1),
    "top2": dict(num_layers=1, num_selected=2),
    "per_token": dict(num_layers=1, num_selected=2, max_sets=0),
}


def build(mesh):
    gens = {
        name: hyper_experts.HyperExpertGenerator(
            num_experts=E, d_model=D, num_layers=kw["num_layers"], num_selected=kw["num_selected"],
            config=HyperExpertsConfig(bottleneck_dim=4, max_sets=kw.get("max_sets", 256)))
        for name, kw in GENERATORS.items()
    }
    layers = {
        name: sparse_mlp(eval_capacity_factor=0.5, min_capacity=1, mesh=mesh, **kw)
        for name, (kw, _, _) in MESH_LAYERS.items()
    }

    def init(key, x):
        variables = {"params": {}, routers.FROZEN: {}}
        hyper_inputs = {}
        for name, gen in gens.items():
            v = gen.init(key)
            variables["params"][name] = v["params"]
            hyper_inputs[name] = gen.apply(v)
        for name, layer in layers.items():
            gen_name, m = MESH_LAYERS[name][1] or (None, None)
            hi = None
            if gen_name is not None:
                hi = jax.tree.map(lambda a, m=m: a[m], hyper_inputs[gen_name])
            v = layer.init(key, x, hyper_inputs=hi)
            for col in v:
                variables[col][name] = v[col]
        return variables

    def apply(params, frozen, x):
        hyper_inputs = {n: g.apply({"params": params[n]}) for n, g in gens.items()}
        outs, lb, dropped = {}, 0.0, {}
        for name, layer in layers.items():
            _, gen, active_k = MESH_LAYERS[name]
            hi = None
            if gen is not None:
                hi = jax.tree.map(lambda a, m=gen[1]: a[m], hyper_inputs[gen[0]])
            v = {"params": params[name]}
            if name in frozen:
                v[routers.FROZEN] = frozen[name]
            k = None if active_k is None else jnp.int32(active_k)
            outs[name], aux = layer.apply(v, x, hyper_inputs=hi, active_k=k)
            lb = lb + aux.load_balance_loss + aux.z_loss
            dropped[name] = aux.metrics["dropped_fraction"]
        return outs, lb, dropped

    return init, apply


def value_and_grads(apply, cot):
    def loss(params, frozen, x):
        outs, lb, dropped = apply(params, frozen, x)
        return sum(jnp.sum(outs[n] * cot[n]) for n in outs) + lb, (outs, dropped)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 2), has_aux=True))


@functools.cache
def single_device_result():
    x = jax.random.normal(jax.random.PRNGKey(0), (B, L, D))
    init, apply = build(None)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(1), x)
    variables = random_values(abstract, 11)
    cot = {n: jax.random.normal(jax.random.PRNGKey(i), (B, L, D))
           for i, n in enumerate(MESH_LAYERS)}
    (loss, (outs, dropped)), grads = value_and_grads(apply, cot)(
        variables["params"], variables[routers.FROZEN], x)
    assert all(float(v) > 0 for v in dropped.values()), dropped  # capacity drops tokens
    return x, abstract, variables, cot, (loss, outs, grads)


@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_every_variant_on_a_mesh_equals_one_device(mesh_shape):
    x, abstract, variables, cot, (loss, outs, grads) = single_device_result()
    mesh = part.make_mesh(*mesh_shape)
    init, apply = build(mesh)
    with part.axis_rules(mesh):
        shardings = part.params_shardings(mesh, abstract)
        sharded = jax.device_put(variables, shardings)
        x_sharded = jax.device_put(x, part.logical_sharding(mesh, (part.BATCH, None, None)))
        (loss_m, (outs_m, _)), grads_m = value_and_grads(apply, cot)(
            sharded["params"], sharded[routers.FROZEN], x_sharded)
    # Expert weights are really split over the expert axis.
    wi = sharded["params"]["switch"]["moe"]["experts"]["wi"]
    assert wi.sharding.shard_shape(wi.shape)[0] == E // mesh_shape[1]
    np.testing.assert_allclose(loss_m, loss, rtol=1e-5)
    for name in MESH_LAYERS:
        np.testing.assert_allclose(outs_m[name], outs[name], rtol=1e-5, atol=1e-5, err_msg=name)
    flat, _ = jax.tree.flatten_with_path(grads)
    flat_m, _ = jax.tree.flatten_with_path(grads_m)
    for (path, g), (_, g_m) in zip(flat, flat_m):
        g = np.asarray(g)
        scale = max(1.0, float(np.abs(g).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(g_m), g, rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
