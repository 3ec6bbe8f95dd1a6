"""Dropless experts (``DispatchConfig(impl='dropless')``).

Checked against independent references: the naive loop over experts of ``moe_layer_test`` (every
active choice kept), the capacity dispatches with a capacity factor at which nothing drops
(forward, gradients and aux outputs), and the one-device dropless layer on expert-parallel meshes
of 8 fake CPU devices with both exchanges. XLA:CPU has no ``ragged_all_to_all``, so the ragged
exchange runs here through ``emulated_ragged_all_to_all``, written from the collective's documented
semantics (an ``all_gather`` and a masked select): the offsets and sizes the layer computes are
checked on CPU, the collective itself is XLA's. HyperMoE's HyperExperts ride the same grouping.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import all_eqns
from moe_layer_test import (
    D_MODEL,
    GROUP,
    NUM_EXPERTS,
    assert_trees_close,
    make_adapters,
    make_inputs,
    naive_moe,
    naive_route,
    random_params,
)

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import backend, dropless, moe_layer, variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig

CASES = {
    "top1_relu_adapters": dict(num_selected=1, activation="relu", adapters=True),
    "top2_gated_gelu_topk": dict(num_selected=2, activation="gated-gelu",
                                 gate_normalization="softmax_topk"),
}


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """``jax.lax.ragged_all_to_all`` as its docstring defines it: device i's slice
    ``operand[input_offsets[j] : + send_sizes[j]]`` lands on device j at ``output_offsets[j]``;
    the rest of ``output`` is kept."""
    me = jax.lax.axis_index(axis_name)
    ops = jax.lax.all_gather(operand, axis_name)  # [n, N, ...]
    in_off, sizes, out_off = (jax.lax.all_gather(a, axis_name)[:, me]
                              for a in (input_offsets, send_sizes, output_offsets))  # [n]
    rows = jnp.arange(output.shape[0])
    hit = (rows[None] >= out_off[:, None]) & (rows[None] < (out_off + sizes)[:, None])  # [n, M]
    src = jnp.clip(in_off[:, None] + rows[None] - out_off[:, None], 0, operand.shape[0] - 1)
    vals = jax.vmap(lambda a, i: a[i])(ops, src)  # [n, M, ...]
    shape = (*hit.shape, *([1] * (operand.ndim - 1)))
    received = jnp.sum(jnp.where(hit.reshape(shape), vals, 0), axis=0).astype(output.dtype)
    return jnp.where(jnp.any(hit, 0).reshape(shape[1:]), received, output)


def make_layer(cfg, mesh=None, *, dispatch_impl="dropless", capacity_factor=0.5,
               dropless_exchange="auto"):
    """A ``MoeLayer`` of a case (groups of 16; capacity factor 0.5 drops tokens)."""
    return moe_layer.MoeLayer(
        experts=ExpertsConfig(num_experts=NUM_EXPERTS, hidden_dim=32,
                              activation=cfg["activation"]),
        router=RouterConfig(num_selected=cfg["num_selected"],
                            gate_normalization=cfg.get("gate_normalization")),
        dispatch=DispatchConfig(train_capacity_factor=capacity_factor,
                                eval_capacity_factor=capacity_factor, min_capacity=1,
                                group_size=GROUP, impl=dispatch_impl,
                                dropless_exchange=dropless_exchange),
        mesh=mesh,
    )


def _loss_fn(layer, use_adapters):
    def loss(params, x, adapters, mask, cotangent):
        y, aux = layer.apply({"params": params}, x, padding_mask=mask,
                             adapters=adapters if use_adapters else None)
        return jnp.sum(y * cotangent), (y, aux)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _run(layer, params, use_adapters, mesh=None):
    x, mask, cotangent = make_inputs()
    with part.axis_rules(mesh):
        if mesh is not None:
            abstract = jax.eval_shape(lambda: layer.init(jax.random.key(1), x))
            params = jax.device_put(params, part.params_shardings(mesh, abstract)["params"])
        (_, (y, aux)), grads = _loss_fn(layer, use_adapters)(params, x, make_adapters(), mask,
                                                             cotangent)
    return y, grads, aux


@functools.cache
def single_device(name, skewed=False):
    cfg = CASES[name]
    layer = make_layer(cfg)
    x, _, _ = make_inputs()
    params = random_params(layer, x)
    if skewed:  # equal logits: every token picks expert 0 (the worst case of the exchange)
        params["router"]["kernel"] = jnp.zeros_like(params["router"]["kernel"])
    return params, _run(layer, params, cfg.get("adapters", False))


@pytest.mark.parametrize("name", list(CASES))
def test_single_device_matches_naive_loop_and_capacity_dispatch(name):
    cfg = CASES[name]
    use_adapters = cfg.get("adapters", False)
    params, (y, grads, aux) = single_device(name)
    x, mask, cotangent = make_inputs()
    k = cfg["num_selected"]
    logits = np.asarray(jnp.einsum("gsd,de->gse", np.asarray(x).reshape(-1, GROUP, D_MODEL),
                                   params["router"]["kernel"]))
    mask_np = np.asarray(mask).reshape(-1, GROUP)
    choice, kept = naive_route(logits, mask_np, k, capacity=GROUP)  # room for every token
    assert kept[mask_np > 0].all()

    def naive_loss(params, x, adapters):
        y = naive_moe(params, x, choice, kept, mask_np, cfg, adapters if use_adapters else None)
        return jnp.sum(y * cotangent), y

    (_, y_ref), grads_ref = jax.jit(jax.value_and_grad(naive_loss, argnums=(0, 1, 2),
                                                       has_aux=True))(params, x, make_adapters())
    assert_trees_close(y, y_ref)
    assert_trees_close(grads, grads_ref)
    assert float(aux.metrics["dropped_fraction"]) == 0.0
    assert float(jnp.abs(grads[0]["router"]["kernel"]).max()) > 1e-3

    # The capacity dispatch at a factor where nothing drops (C = S; the dropless layer was built
    # with the factor 0.5, which drops tokens on the capacity path: it is unused).
    full = make_layer(cfg, dispatch_impl="gather", capacity_factor=NUM_EXPERTS / k)
    y_c, grads_c, aux_c = _run(full, params, use_adapters)
    assert float(aux_c.metrics["dropped_fraction"]) == 0.0
    assert_trees_close((y, grads), (y_c, grads_c))
    assert_trees_close((aux.load_balance_loss, aux.z_loss, aux.metrics),
                       (aux_c.load_balance_loss, aux_c.z_loss, aux_c.metrics))
    np.testing.assert_array_equal(aux.kept, aux_c.kept)
    assert "ragged_dot_general" in {e.primitive.name for e in all_eqns(jax.make_jaxpr(
        lambda p: make_layer(cfg).apply({"params": p}, x))(params))}


MESH_CASES = [
    ("top1_relu_adapters", (2, 4, 1), "all_to_all", True),
    ("top2_gated_gelu_topk", (1, 4, 2), "ragged_all_to_all", False),
    ("top1_relu_adapters", (1, 8, 1), "ragged_all_to_all", True),
]


@pytest.mark.parametrize("name,shape,exchange,skewed", MESH_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_expert_parallel_equals_one_device(monkeypatch, name, shape, exchange, skewed):
    """Both exchanges on meshes with data, expert and model axes; ``skewed``: every token goes to
    expert 0, so one device receives every row of its data row (the receive buffer's worst
    case)."""
    monkeypatch.setattr(dropless, "_ragged_all_to_all", emulated_ragged_all_to_all)
    cfg = CASES[name]
    params, (y1, grads1, aux1) = single_device(name, skewed)
    if skewed:
        assert float(aux1.metrics["expert_load"][0]) == 1.0 / cfg["num_selected"]
    mesh = part.make_mesh(*shape)
    layer = make_layer(cfg, mesh, dropless_exchange=exchange)
    y, grads, aux = _run(layer, params, cfg.get("adapters", False), mesh)
    assert_trees_close((y, grads), (y1, grads1))
    np.testing.assert_array_equal(aux.kept, aux1.kept)
    x, _, _ = make_inputs()
    with part.axis_rules(mesh):
        prims = {e.primitive.name for e in all_eqns(jax.make_jaxpr(
            lambda p: layer.apply({"params": p}, x)[0])(params))}
    assert ("all_to_all" in prims) == (exchange == "all_to_all"), prims


# --------------------------------------------------------------------------------------------
# HyperMoE on the dropless path
# --------------------------------------------------------------------------------------------

HYPER = HyperExpertsConfig(bottleneck_dim=4, expert_embed_dim=8, selection_hidden_dim=8,
                           selection_dim=8, hyper_hidden_dim=8)


def _hyper_loss(variant, placement, impl, cf=2.0):
    mlp = variants.SparseMlp(variants.moe_config(
        variant, experts=ExpertsConfig(num_experts=NUM_EXPERTS, hidden_dim=16),
        router=RouterConfig(num_selected=1),
        dispatch=DispatchConfig(eval_capacity_factor=cf, min_capacity=1, group_size=GROUP,
                                impl=impl),
        hyper_experts=HyperExpertsConfig(**{**HYPER.__dict__, "placement": placement})))

    def loss(params, hyper_inputs, x, mask, cotangent):
        y, _ = mlp.apply({"params": params}, x, padding_mask=mask, hyper_inputs=hyper_inputs)
        return jnp.sum(y * cotangent)

    return mlp, loss


def test_hypermoe_rides_the_expert_grouping():
    """The HyperExpert of each token joins the experts' rows: the dense placement (exact to the
    official code) with dropless dispatch equals it on the capacity path with no drops (output and
    gradients, HyperExperts included), and the layer sorts its tokens once, as the Switch layer
    does. (With dropless top-1 the fused placement takes the same path.)"""
    placement = "dense"
    x, mask, cotangent = make_inputs()
    keys = jax.random.split(jax.random.key(3), 4)
    hyper_inputs = {"w_down": jax.random.normal(keys[0], (NUM_EXPERTS, D_MODEL, 4)) * 0.3,
                    "b_down": jax.random.normal(keys[1], (NUM_EXPERTS, 4)) * 0.1,
                    "w_up": jax.random.normal(keys[2], (NUM_EXPERTS, 4, D_MODEL)) * 0.5,
                    "b_up": jax.random.normal(keys[3], (NUM_EXPERTS, D_MODEL)) * 0.1}
    mlp, loss = _hyper_loss("hypermoe", placement, "dropless")
    init = functools.partial(mlp.init, hyper_inputs=hyper_inputs)
    params = random_params(types.SimpleNamespace(init=init), x)
    out = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        params, hyper_inputs, x, mask, cotangent)
    _, ref_loss = _hyper_loss("hypermoe", placement, "gather", cf=NUM_EXPERTS)
    expected = jax.jit(jax.value_and_grad(ref_loss, argnums=(0, 1, 2)))(
        params, hyper_inputs, x, mask, cotangent)
    assert_trees_close(out, expected)
    assert float(jnp.abs(out[1][1]["w_down"]).max()) > 1e-3  # the HyperExperts get gradients

    def sorts(variant):
        mlp, _ = _hyper_loss(variant, placement, "dropless")
        fn = (lambda p: mlp.apply({"params": p}, x, hyper_inputs=hyper_inputs)) \
            if variant == "hypermoe" else (lambda p: mlp.apply({"params": p}, x))
        p = params if variant == "hypermoe" else {"moe": params["moe"]}
        return sum(e.primitive.name == "sort" for e in all_eqns(jax.make_jaxpr(fn)(p)))

    assert sorts("hypermoe") == sorts("switch") >= 1


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform,exchange", [("cpu", "all_to_all"),
                                               ("gpu", "ragged_all_to_all"),
                                               ("tpu", "ragged_all_to_all")])
def test_exchange_by_backend_and_override(monkeypatch, platform, exchange):
    monkeypatch.setattr(backend, "platform", lambda: platform)
    assert backend.resolve("dropless_exchange", "auto") == exchange
    assert backend.resolve("dropless_exchange", "all_to_all") == "all_to_all"
    # 'auto' never picks dropless: it changes what the layer computes.
    assert backend.resolve("dispatch", "auto") in ("einsum", "gather")


def test_dropless_config_and_errors():
    cfg = DispatchConfig(impl="dropless", train_capacity_factor=0.1, min_capacity=1)
    assert cfg.capacity(GROUP, NUM_EXPERTS, 2, deterministic=False) == GROUP
    with pytest.raises(ValueError, match=r"DispatchConfig.dropless_exchange must be 'auto' .*"
                                         r"'ragged_all_to_all'"):
        DispatchConfig(impl="dropless", dropless_exchange="all_gather")
    with pytest.raises(ValueError, match=r"DispatchConfig.impl must be .*'dropless'"):
        DispatchConfig(impl="dropfree")
