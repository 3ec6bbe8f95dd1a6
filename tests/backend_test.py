"""Implementation choices by backend: the table, the override, and equal results either way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hypermoe_jax.layers import backend, grouped, moe_layer
from hypermoe_jax.layers import dispatch as dispatch_lib
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig


@pytest.mark.parametrize("platform,dispatch,matmul", [
    ("cpu", "gather", "blocked"),
    ("gpu", "gather", "ragged_dot"),
    ("tpu", "einsum", "ragged_dot"),
])
def test_auto_follows_the_table(monkeypatch, platform, dispatch, matmul):
    monkeypatch.setattr(backend, "platform", lambda: platform)
    assert backend.resolve("dispatch", "auto") == dispatch
    assert backend.resolve("grouped_matmul", "auto") == matmul
    # An explicit choice overrides the table on every backend.
    assert backend.resolve("dispatch", "einsum") == "einsum"
    assert backend.resolve("grouped_matmul", "onehot") == "onehot"


def test_this_machine_is_in_the_table():
    assert backend.platform() in ("cpu", "gpu", "tpu")


def test_bad_choices_name_the_field_and_the_options():
    with pytest.raises(ValueError, match=r"DispatchConfig.impl must be 'auto' .*'einsum'"):
        DispatchConfig(impl="scatter")
    with pytest.raises(ValueError, match=r"HyperExpertsConfig.grouped_impl .*'ragged_dot'"):
        HyperExpertsConfig(grouped_impl="dense")
    with pytest.raises(ValueError, match="grouped_adapter_mlp impl"):
        grouped.grouped_adapter_mlp({}, jnp.zeros((4, 2)), jnp.zeros((4,), jnp.int32),
                                    impl="dense")


def _layer(impl):
    return moe_layer.MoeLayer(
        experts=ExpertsConfig(num_experts=4, hidden_dim=16),
        dispatch=DispatchConfig(eval_capacity_factor=0.5, min_capacity=1, impl=impl),
    )


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_auto_dispatch_equals_both_explicit_forms(monkeypatch, platform):
    monkeypatch.setattr(backend, "platform", lambda: platform)
    plans = []
    make = dispatch_lib.make_dispatch
    monkeypatch.setattr(dispatch_lib, "make_dispatch",
                        lambda *a: plans.append(make(*a)) or plans[-1])
    x = jax.random.normal(jax.random.key(0), (2, 16, 8))
    params = nn.unbox(_layer("auto").init(jax.random.key(1), x)["params"])
    params["router"]["kernel"] = params["router"]["kernel"] * 100  # spread tokens, drop some
    out = {impl: _layer(impl).apply({"params": params}, x) for impl in ("auto", "einsum",
                                                                       "gather")}
    assert float(out["auto"][1].metrics["dropped_fraction"]) > 0
    for impl in ("einsum", "gather"):
        np.testing.assert_allclose(out["auto"][0], out[impl][0], rtol=1e-6, atol=1e-6)
    want = dispatch_lib.SlotDispatch if platform == "cpu" else dispatch_lib.MaskDispatch
    assert [type(p) for p in plans[-3:]] == [
        want, dispatch_lib.MaskDispatch, dispatch_lib.SlotDispatch]


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_auto_grouped_matmul_equals_per_token_weights(monkeypatch, platform):
    monkeypatch.setattr(backend, "platform", lambda: platform)
    ks = jax.random.split(jax.random.key(2), 6)
    m, t, d, b = 4, 64, 8, 3
    adapters = {"w_down": jax.random.normal(ks[0], (m, d, b)),
                "b_down": jax.random.normal(ks[1], (m, b)),
                "w_up": jax.random.normal(ks[2], (m, b, d)),
                "b_up": jax.random.normal(ks[3], (m, d))}
    x = jax.random.normal(ks[4], (t, d))
    ids = jax.random.randint(ks[5], (t,), 0, m)

    def fn(a, x):
        return grouped.grouped_adapter_mlp(a, x, ids)

    w = {k: v[ids] for k, v in adapters.items()}
    ref = jnp.einsum("tb,tbd->td", jax.nn.relu(jnp.einsum("td,tdb->tb", x, w["w_down"])
                                               + w["b_down"]), w["w_up"]) + w["b_up"]
    np.testing.assert_allclose(fn(adapters, x), ref, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(fn)(adapters, x))
    assert ("ragged_dot" in jaxpr) == (platform == "gpu")
