"""Batched expert MLPs against a per-expert numpy loop; weight partitioning and sharding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import experts

E, G, C, D, F = 4, 2, 3, 8, 16


def np_act(name, v):
    if name == "relu":
        return np.maximum(v, 0.0)
    if name in ("gelu", "gated-gelu"):
        return 0.5 * v * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))
    if name in ("silu", "gated-silu"):
        return v / (1.0 + np.exp(-v))
    raise ValueError(name)


def np_expert_mlp(weights, x, activation):
    """Loop over experts and tokens' groups: y[e] = act(x[e] W_in[e]) W_out[e]."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    for e in range(x.shape[0]):
        for g in range(x.shape[1]):
            if activation.startswith("gated-"):
                h = np_act(activation, x[e, g] @ w["wi_0"][e]) * (x[e, g] @ w["wi_1"][e])
            else:
                h = np_act(activation, x[e, g] @ w["wi"][e])
            y[e, g] = h @ w["wo"][e]
    return y


def init_experts(activation, num_experts=E, d=D, f=F):
    module = experts.MlpExperts(num_experts=num_experts, hidden_dim=f, activation=activation)
    variables = module.init(jax.random.key(0), d)
    return module, variables


@pytest.mark.parametrize("activation", experts.ACTIVATIONS)
def test_expert_mlp_matches_loop(activation):
    _, variables = init_experts(activation)
    weights = nn.unbox(variables["params"])
    names = {"wi_0", "wi_1", "wo"} if experts.is_gated(activation) else {"wi", "wo"}
    assert set(weights) == names
    x = jax.random.normal(jax.random.key(1), (E, G, C, D))
    y = jax.jit(lambda w, x: experts.expert_mlp(w, x, activation=activation))(weights, x)
    assert y.shape == (E, G, C, D)
    np.testing.assert_allclose(y, np_expert_mlp(weights, x, activation), rtol=1e-5, atol=1e-5)


def test_expert_mlp_bfloat16_compute():
    _, variables = init_experts("relu")
    weights = nn.unbox(variables["params"])
    x = jax.random.normal(jax.random.key(1), (E, G, C, D))
    y = experts.expert_mlp(weights, x, activation="relu", dtype=jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        y.astype(np.float32), np_expert_mlp(weights, x, "relu"), rtol=5e-2, atol=5e-2
    )


def test_expert_dropout():
    _, variables = init_experts("relu")
    weights = nn.unbox(variables["params"])
    x = jax.random.normal(jax.random.key(1), (E, G, C, D))
    plain = experts.expert_mlp(weights, x, activation="relu")
    no_rng = experts.expert_mlp(weights, x, activation="relu", dropout_rate=0.5)
    np.testing.assert_array_equal(no_rng, plain)
    a = experts.expert_mlp(
        weights, x, activation="relu", dropout_rate=0.5, dropout_rng=jax.random.key(0)
    )
    b = experts.expert_mlp(
        weights, x, activation="relu", dropout_rate=0.5, dropout_rng=jax.random.key(1)
    )
    assert not np.allclose(a, plain) and not np.allclose(a, b)


def test_adapter_mlp_matches_loop():
    rng = np.random.default_rng(0)
    b = 5
    adapters = {
        "w_down": rng.normal(size=(E, D, b)),
        "b_down": rng.normal(size=(E, b)),
        "w_up": rng.normal(size=(E, b, D)),
        "b_up": rng.normal(size=(E, D)),
    }
    adapters = {k: jnp.asarray(v, jnp.float32) for k, v in adapters.items()}
    assert set(adapters) == set(experts.ADAPTER_KEYS)
    x = jax.random.normal(jax.random.key(1), (E, G, C, D))
    y = experts.adapter_mlp(adapters, x)
    a = {k: np.asarray(v, np.float64) for k, v in adapters.items()}
    xn = np.asarray(x, np.float64)
    for e in range(E):
        h = np.maximum(xn[e] @ a["w_down"][e] + a["b_down"][e], 0.0)
        np.testing.assert_allclose(y[e], h @ a["w_up"][e] + a["b_up"][e], rtol=1e-5, atol=1e-5)


def test_unknown_activation():
    with pytest.raises(ValueError, match="Unknown activation 'swish'"):
        init_experts("swish")


@pytest.mark.parametrize("activation", ["relu", "gated-gelu"])
def test_weight_partitioning_metadata(activation):
    _, variables = init_experts(activation)
    specs = nn.get_partition_spec(variables)["params"]
    for name, spec in specs.items():
        if name == "wo":
            assert tuple(spec) == ("expert", "expert_mlp", "embed")
        else:
            assert tuple(spec) == ("expert", "embed", "expert_mlp")
    weights = nn.unbox(variables["params"])
    assert experts.expert_weight_specs(weights) == {n: tuple(s) for n, s in specs.items()}


def test_fan_in_init_per_expert():
    _, variables = init_experts("relu", num_experts=8, d=64, f=128)
    wi = np.asarray(nn.unbox(variables["params"])["wi"])
    # Fan-in variance 1/d per expert (E is a batch axis, not part of the fan-in).
    np.testing.assert_allclose(wi.std(axis=(1, 2)), 64**-0.5, rtol=0.1)


def test_params_shardings_put_experts_on_expert_axis():
    mesh = part.make_mesh(2, 4, 1)
    module = experts.MlpExperts(num_experts=8, hidden_dim=F)
    with part.axis_rules(mesh):
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), D))
        shardings = part.params_shardings(mesh, abstract)
        variables = jax.jit(lambda: module.init(jax.random.key(0), D), out_shardings=shardings)()
    params = nn.unbox(variables["params"])
    for name, w in params.items():
        spec = w.sharding.spec
        assert spec[0] == part.EXPERT, (name, spec)
        # 8 experts over an expert axis of 4: 2 experts per device, the rest unsplit.
        assert {s.data.shape for s in w.addressable_shards} == {(2, *w.shape[1:])}
    assert params["wi"].sharding.spec == jax.sharding.PartitionSpec(part.EXPERT, None, part.MODEL)
    assert params["wo"].sharding.spec == jax.sharding.PartitionSpec(part.EXPERT, part.MODEL, None)
