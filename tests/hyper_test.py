"""HyperMoE's efficient form against a literal per-token reference; HyperExpert generation.

``literal_hyper_expert`` computes the HyperExpert as the official PyTorch code does, token by
token: gather the embeddings of the token's unselected experts and sum them, run the layer's
selection MLP, concatenate the layer embedding, run the shared hypernetwork, reshape its flat head
outputs into per-token weights ``[T, d, b]`` and apply them. It reads the same parameter values as
``hyper_experts.py`` (by name) but none of its code. The MoE part of the reference is ``MoeLayer``
with the same weights (itself checked against a naive loop in ``moe_layer_test.py``).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import all_eqns

from hypermoe_jax.layers import grouped, hyper_experts, moe_layer, variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig

RTOL = ATOL = 1e-5
BATCH, LENGTH, D_MODEL, HIDDEN, BNECK = 4, 16, 12, 32, 6
NUM_LAYERS = 2


# --------------------------------------------------------------------------------------------
# Literal reference
# --------------------------------------------------------------------------------------------


def literal_hyper_expert(gen_params, layer, x, topk, num_experts):
    """Official-style HyperExpert of layer ``layer`` for tokens x <[T, d]> with top-k ``topk``
    (a concrete <int>[T, K] array: the routing decision, through which no gradient flows)."""
    topk = np.asarray(topk)
    num_tokens, d = x.shape
    # Per token, the indices of its unselected experts (torch.nonzero(1 - onehot(top-k))).
    unselected = np.stack(
        [np.array([j for j in range(num_experts) if j not in set(row)]) for row in topk]
    )  # [T, N - K]
    emb = gen_params["expert_embedding"][layer]  # [N, d_e]
    s_tilde = jnp.sum(emb[unselected], axis=1)  # plain sum of the gathered embeddings
    h1 = s_tilde @ gen_params["selection_w1"][layer] + gen_params["selection_b1"][layer]
    h1 = jnp.maximum(h1, 0.0)
    s = h1 @ gen_params["selection_w2"][layer] + gen_params["selection_b2"][layer]
    layer_emb = jnp.broadcast_to(gen_params["layer_embedding"][layer], (num_tokens, 10))
    z = jnp.concatenate([s, layer_emb], axis=-1)
    hn = gen_params["hypernet"]
    hid = jnp.maximum(z @ hn["hidden_kernel"] + hn["hidden_bias"], 0.0)  # [T, 128]
    hh = hid.shape[-1]
    b = hn["b_down_bias"].shape[0]
    # The four heads as flat Linear layers (weight [hh, out], bias [out]), outputs viewed per token.
    flat_wd = hid @ hn["w_down_kernel"].reshape(hh, d * b) + hn["w_down_bias"].reshape(d * b)
    flat_wu = hid @ hn["w_up_kernel"].reshape(hh, b * d) + hn["w_up_bias"].reshape(b * d)
    bd = hid @ hn["b_down_kernel"] + hn["b_down_bias"]
    bu = hid @ hn["b_up_kernel"] + hn["b_up_bias"]
    w_down = flat_wd.reshape(num_tokens, d, b)  # per-token weights, as the official code
    w_up = flat_wu.reshape(num_tokens, b, d)
    r = jnp.maximum(jnp.einsum("tj,tjk->tk", x, w_down) + bd, 0.0)
    return jnp.einsum("tk,tkj->tj", r, w_up) + bu


def reference_topk(layer_params, x, k):
    """Router top-k from the router kernel, computed here (ties have probability 0)."""
    logits = np.asarray(x, np.float64) @ np.asarray(layer_params["moe"]["router"]["kernel"])
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


def make_modules(num_experts, k, placement="dense", cf=None, max_sets=256, impl="blocked"):
    hcfg = HyperExpertsConfig(bottleneck_dim=BNECK, max_sets=max_sets, placement=placement,
                              grouped_impl=impl)
    gen = hyper_experts.HyperExpertGenerator(
        num_layers=NUM_LAYERS, num_experts=num_experts, num_selected=k, d_model=D_MODEL,
        config=hcfg,
    )
    cf = float(num_experts) if cf is None else cf  # cf = E: nothing is ever dropped
    experts = ExpertsConfig(num_experts=num_experts, hidden_dim=HIDDEN)
    router = RouterConfig(num_selected=k)
    dispatch = DispatchConfig(eval_capacity_factor=cf, min_capacity=1, impl="einsum")
    layer = variants.SparseMlp(variants.moe_config(
        "hypermoe", experts=experts, router=router, dispatch=dispatch, hyper_experts=hcfg))
    moe = moe_layer.MoeLayer(experts=experts, router=router, dispatch=dispatch)
    return gen, layer, moe


def random_params(abstract, seed):
    """Random values for a parameter tree (from ``jax.eval_shape``; nothing is compiled).

    Every value is exercised at O(1) scale: fan-in scaled normals for kernels, N(0, 1) for the
    embedding tables and N(0, 0.1^2) for biases (which the real init sets to 0; the real init of
    the hypernetwork heads, ~1e-3, would make any comparison trivially pass).
    """
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = jax.tree_util.keystr(path)
        shape = leaf.shape
        if "embedding" in name:
            std = 1.0
        elif "bias" in name or name.endswith("_b1']") or name.endswith("_b2']") or len(shape) < 2:
            std = 0.1
        elif "hypernet" in name and len(shape) == 3:  # heads [h, d, b]: W entries ~ 1/sqrt(d)
            std = 1.0 / math.sqrt(shape[0] * shape[1])
        else:
            std = 1.0 / math.sqrt(shape[-2])
        return jnp.asarray(rng.normal(0.0, std, shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


def init_params(gen, layer, key):
    x = jax.random.normal(jax.random.fold_in(key, 1), (BATCH, LENGTH, D_MODEL))

    def init(key):
        gen_params = nn.meta.unbox(gen.init(key)["params"])
        hi = gen.apply({"params": gen_params})
        slice0 = jax.tree.map(lambda a: a[0], hi)
        params = {"generator": gen_params}
        for m in range(NUM_LAYERS):
            v = layer.init(key, x, hyper_inputs=slice0)
            params[f"layer_{m}"] = nn.meta.unbox(v["params"])
        return params

    abstract = jax.eval_shape(init, key)
    return random_params(abstract, int(jax.random.randint(key, (), 0, 2**30))), x


def forward_fn(gen, layer):
    """(params, x) -> (y <[layers, B, L, d]>, [MoeAux per layer])."""

    def f(params, x):
        hi = gen.apply({"params": params["generator"]})
        outs, auxes = [], []
        for m in range(NUM_LAYERS):
            y, aux = layer.apply({"params": params[f"layer_{m}"]}, x,
                                 hyper_inputs=jax.tree.map(lambda a, m=m: a[m], hi))
            outs.append(y)
            auxes.append(aux)
        return jnp.stack(outs), auxes

    return f


def reference_forward_fn(moe, topks, num_experts):
    """(params, x, hyper_mask) -> MoE output + literal HyperExpert where ``hyper_mask`` (per layer
    <[B, L]>: all ones for the dense placement, the kept tokens for the fused one)."""

    def f(params, x, hyper_mask):
        outs = []
        for m in range(NUM_LAYERS):
            y_moe, _ = moe.apply({"params": params[f"layer_{m}"]["moe"]}, x)
            h = literal_hyper_expert(params["generator"], m, x.reshape(-1, D_MODEL),
                                     topks[m].reshape(-1, topks[m].shape[-1]), num_experts)
            outs.append(y_moe + h.reshape(x.shape) * hyper_mask[m][..., None])
        return jnp.stack(outs), None

    return f


def value_and_grads(f, cot):
    """jit of (params, x, *rest) -> ((y, aux), (d params, d x)) of ``sum(y * cot)``."""

    def loss(params, x, *rest):
        y, aux = f(params, x, *rest)
        return jnp.sum(y * cot), (y, aux)

    vg = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    return jax.jit(lambda *a: (vg(*a)[0][1], vg(*a)[1]))


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    """Leafwise ``|a - b| <= atol * max(1, max|b|) + rtol * |b|``: gradients are sums over all
    tokens (entries up to ~1e2 here), so float32 rounding is relative to each leaf's scale."""
    flat_a, _ = jax.tree.flatten_with_path(a)
    flat_b, _ = jax.tree.flatten_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, u), (_, v) in zip(flat_a, flat_b):
        v = np.asarray(v)
        scale = max(1.0, float(np.abs(v).max(initial=0.0)))
        np.testing.assert_allclose(np.asarray(u), v, rtol=rtol, atol=atol * scale,
                                   err_msg=jax.tree_util.keystr(path))


# --------------------------------------------------------------------------------------------
# Efficient == literal
# --------------------------------------------------------------------------------------------

CASES = [
    # (num_experts, k, dropped, max_sets); top-1 runs both placements, top-k the dense one.
    (4, 1, True, 256),
    (4, 1, False, 256),
    (8, 1, True, 256),
    (8, 1, False, 256),
    (4, 2, True, 256),
    (4, 2, False, 256),
    (8, 2, True, 256),
    (8, 2, False, 256),
    (8, 2, True, 0),  # per-token fallback
    (8, 3, False, 0),  # per-token fallback, top-3
]


@pytest.mark.parametrize("num_experts,k,dropped,max_sets", CASES)
def test_efficient_equals_literal(num_experts, k, dropped, max_sets):
    cf = 0.5 if dropped else None
    gen, layer, moe = make_modules(num_experts, k, "dense", cf, max_sets)
    params, x = init_params(gen, layer, jax.random.PRNGKey(num_experts * 10 + k))
    cot = jax.random.normal(jax.random.PRNGKey(7), (NUM_LAYERS, *x.shape))
    topks = [reference_topk(params[f"layer_{m}"], x, k) for m in range(NUM_LAYERS)]
    ref = value_and_grads(reference_forward_fn(moe, topks, num_experts), cot)
    ones = np.ones((NUM_LAYERS, BATCH, LENGTH), np.float32)

    # Top-1 also runs the fused placement, with both dispatch forms (einsum and gather: each
    # folds the ungated HyperExpert into the experts' single combine its own way).
    placements = ["dense", "fused", "fused_gather"] if k == 1 else ["dense"]
    ys = {}
    for name in placements:
        placement = name.split("_")[0]
        cfg = layer.config
        cfg = dataclasses.replace(
            cfg, hyper_experts=dataclasses.replace(cfg.hyper_experts, placement=placement),
            dispatch=dataclasses.replace(
                cfg.dispatch, impl="gather" if name.endswith("gather") else "einsum"))
        eff = value_and_grads(forward_fn(gen, layer.clone(config=cfg)), cot)
        (y, auxes), g_eff = eff(params, x)
        for m, aux in enumerate(auxes):
            np.testing.assert_array_equal(np.sort(np.asarray(aux.expert_index), -1),
                                          np.sort(topks[m], -1))
        kept = np.stack([np.asarray(aux.kept[..., 0]) for aux in auxes])
        assert (~np.stack([np.asarray(a.kept) for a in auxes])).any() == dropped
        mask = ones if placement == "dense" else kept.astype(np.float32)
        (y_ref, _), g_ref = ref(params, x, mask)
        np.testing.assert_allclose(y, y_ref, rtol=RTOL, atol=ATOL, err_msg=name)
        ys[name] = np.asarray(y)
        assert_trees_close(g_eff, g_ref)
        # Every generator parameter gets a gradient (both layers feed the shared hypernetwork).
        for path, g in jax.tree.flatten_with_path(g_eff[0]["generator"])[0]:
            assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)

    if len(ys) > 1:  # dense and fused differ exactly on the dropped tokens
        diff = np.abs(ys["dense"] - ys["fused"]).max(-1)
        np.testing.assert_array_less(diff[kept], 1e-5)
        assert (diff[~kept] > 1e-3).all()
    # The HyperExpert is a sizeable part of the output (not a vanishing term).
    (y_moe, _), _ = ref(params, x, 0 * ones)
    assert np.abs(y_ref - y_moe).mean() > 0.1 * np.abs(y_moe).mean()


def test_no_router_gradient_through_the_hyper_expert():
    gen, layer, _ = make_modules(8, 2, "dense", cf=0.5)
    params, x = init_params(gen, layer, jax.random.PRNGKey(4))
    switch = variants.SparseMlp(dataclasses.replace(layer.config, hyper_experts=None))
    assert switch.config.variant == "switch"
    eff = forward_fn(gen, layer)

    @jax.jit
    @jax.grad
    def grad_hyper_part(params, x):
        y, _ = eff(params, x)
        y_switch = jnp.stack([switch.apply({"params": params[f"layer_{m}"]}, x)[0]
                              for m in range(NUM_LAYERS)])
        return jnp.sum((y - y_switch) ** 2)

    # y - y_switch is the HyperExpert alone: zero gradient to the router and the experts, up to the
    # rounding of (y_moe + H) - y_moe.
    g = grad_hyper_part(params, x)
    for m in range(NUM_LAYERS):
        for name in ("router", "experts"):
            for leaf in jax.tree.leaves(g[f"layer_{m}"]["moe"][name]):
                np.testing.assert_allclose(leaf, 0.0, atol=1e-5)
    assert np.abs(np.asarray(g["generator"]["hypernet"]["w_up_kernel"])).max() > 1e-2


@pytest.mark.parametrize("k,max_sets", [(1, 256), (2, 256), (2, 0)])
def test_no_per_token_weights_are_materialised(k, max_sets):
    """No intermediate of the forward or backward pass has per-token weights [T, d, b]."""
    gen, layer, _ = make_modules(8, k, "dense", max_sets=max_sets)
    params, x = init_params(gen, layer, jax.random.PRNGKey(5))
    eff = forward_fn(gen, layer)
    num_tokens = BATCH * LENGTH
    jaxpr = jax.make_jaxpr(jax.grad(lambda p, x: jnp.sum(eff(p, x)[0] ** 2), argnums=(0, 1)))(
        params, x
    )
    shapes = [tuple(v.aval.shape) for eqn in all_eqns(jaxpr) for v in eqn.outvars
              if hasattr(v.aval, "shape")]
    assert shapes
    for s in shapes:
        if len(s) >= 3 and s[-2:] in ((D_MODEL, BNECK), (BNECK, D_MODEL)):
            per_token = num_tokens in s[:-2] or s[:2] == (BATCH, LENGTH)
            assert not per_token, f"per-token weights {s}"


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(4, 1), (5, 2), (8, 3)])
def test_combination_ids_enumerate_the_subsets(n, k):
    combos = hyper_experts.combinations(n, k)
    assert combos.shape == (math.comb(n, k), k)
    ids = np.asarray(hyper_experts.combination_ids(jnp.asarray(combos), n))
    np.testing.assert_array_equal(ids, np.arange(len(combos)))
    # Order inside a set does not matter.
    ids_rev = np.asarray(hyper_experts.combination_ids(jnp.asarray(combos[:, ::-1]), n))
    np.testing.assert_array_equal(ids_rev, ids)
    masks = hyper_experts.unselected_masks(n, k)
    np.testing.assert_array_equal(masks.sum(-1), n - k)
    for row, c in zip(masks, combos):
        assert not row[c].any()


def random_adapters(keys, m, d, b):
    """M adapters with O(1) entries (``experts.ADAPTER_KEYS``)."""
    shapes = {"w_down": (m, d, b), "b_down": (m, b), "w_up": (m, b, d), "b_up": (m, d)}
    return {k: jax.random.normal(key, shape) for key, (k, shape) in zip(keys, shapes.items())}


def per_token_adapters(a, x, ids):
    """Reference: each token's adapter weights gathered per token, then applied."""
    w = {k: v[ids] for k, v in a.items()}
    h = jnp.maximum(jnp.einsum("td,tdb->tb", x, w["w_down"]) + w["b_down"], 0.0)
    return jnp.einsum("tb,tbd->td", h, w["w_up"]) + w["b_up"]


@pytest.mark.parametrize(
    "impl,capacity_factor,skewed",
    [
        ("blocked", None, False),  # the exact blocked layout only
        ("blocked", 1.5, False),  # every adapter within capacity: the [M, cap, d] fast path
        ("blocked", 1.5, True),  # one adapter over capacity: the switch falls back to blocked
        ("ragged_dot", None, True),
        ("onehot", None, True),
    ],
)
def test_grouped_impls_equal_per_token_weights(impl, capacity_factor, skewed):
    key = jax.random.PRNGKey(0)
    m, t, d, b = 5, 256, 12, 5
    ks = jax.random.split(key, 7)
    adapters = random_adapters(ks[:4], m, d, b)
    x = jax.random.normal(ks[4], (t, d))
    ids = jax.random.randint(ks[5], (t,), 0, m)
    if skewed:  # 60% of the tokens on adapter 0, adapter m-1 unused
        ids = jnp.where(jax.random.uniform(ks[6], (t,)) < 0.6, 0, jnp.minimum(ids, m - 2))
    fn = jax.jit(lambda a, x: grouped.grouped_adapter_mlp(
        a, x, ids, impl=impl, block_size=64, capacity_factor=capacity_factor))
    if capacity_factor is not None:
        # Layouts: blocked 512 rows (blk = 64), capacity 5 x 80 = 400 rows: the cond is used, and
        # takes the capacity branch unless an adapter has more than 80 tokens.
        assert "cond[" in str(jax.make_jaxpr(fn)(adapters, x))
        assert (int(jnp.bincount(ids, length=m).max()) > 80) == skewed

    def loop(a, x):
        return per_token_adapters(a, x, ids)

    np.testing.assert_allclose(fn(adapters, x), loop(adapters, x), rtol=RTOL, atol=1e-4)
    cot = jax.random.normal(key, (t, d))
    g1 = jax.grad(lambda a, x: jnp.sum(fn(a, x) * cot), argnums=(0, 1))(adapters, x)
    g2 = jax.grad(lambda a, x: jnp.sum(loop(a, x) * cot), argnums=(0, 1))(adapters, x)
    assert_trees_close(g1, g2, atol=1e-4)


@pytest.mark.parametrize("skew", [0.0, 0.3, 0.6])
def test_grouped_layout_switch_with_residual_and_mask(skew):
    """Three capacity layouts and the blocked one behind one switch: the layout taken depends on
    the largest adapter (skew 0: the tightest, 0.3: a wider one, 0.6: blocked); the residual and
    the token mask are applied inside the branch and the backward is hand-written."""
    key = jax.random.PRNGKey(1)
    m, t, d, b = 8, 512, 12, 5
    ks = jax.random.split(key, 9)
    adapters = random_adapters(ks[:4], m, d, b)
    x = jax.random.normal(ks[4], (t, d))
    residual = jax.random.normal(ks[5], (t, d))
    mask = jax.random.uniform(ks[6], (t,)) < 0.8
    ids = jnp.arange(t) % m  # 64 tokens each
    ids = jnp.where(jax.random.uniform(ks[7], (t,)) < skew, 0, ids)
    factors = (1.25, 2.0, 3.0)  # caps 80, 128, 192
    largest = int(jnp.bincount(ids, length=m).max())
    taken = sum(largest > c for c in (80, 128, 192))
    assert taken == {0.0: 0, 0.3: 2, 0.6: 3}[skew]

    def fn(a, x, r):
        return grouped.grouped_adapter_mlp(a, x, ids, impl="blocked", capacity_factor=factors,
                                           residual=r, token_mask=mask, block_size=16)

    def loop(a, x, r):
        return r + per_token_adapters(a, x, ids) * mask[:, None]

    np.testing.assert_allclose(jax.jit(fn)(adapters, x, residual), loop(adapters, x, residual),
                               rtol=RTOL, atol=1e-4)
    cot = jax.random.normal(ks[8], (t, d))
    g1 = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=(0, 1, 2)))(
        adapters, x, residual)
    g2 = jax.grad(lambda *a: jnp.sum(loop(*a) * cot), argnums=(0, 1, 2))(adapters, x, residual)
    assert_trees_close(g1, g2, atol=1e-4)
    # Masked tokens get no gradient into x; the residual's gradient is the cotangent itself.
    assert float(jnp.abs(g1[1][~mask]).max()) == 0.0
    np.testing.assert_array_equal(g1[2], cot)
    # The forward keeps no per-branch row buffers for the backward (plain autodiff of the switch
    # would return [m, cap, d] and [m, cap, b] residuals of every capacity layout, zeros for the
    # layouts not taken).
    jaxpr = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(fn(*a) * cot)))(adapters, x, residual)
    outs = {v.aval.shape for e in jaxpr.jaxpr.eqns for v in e.outvars}
    assert not [o for o in outs if len(o) == 3 and o[:2] in ((m, 80), (m, 128), (m, 192))], outs


def test_generator_init_and_outputs():
    n_l, n, d, b = 3, 4, 24, 8
    gen = hyper_experts.HyperExpertGenerator(num_layers=n_l, num_experts=n, num_selected=1,
                                             d_model=d, config=HyperExpertsConfig(bottleneck_dim=b))
    variables = gen.init(jax.random.PRNGKey(0))
    p = nn.meta.unbox(variables["params"])
    hn = p["hypernet"]
    hh = 128
    bounds = {
        "w_down_kernel": 1e-3 * math.sqrt(3 / (hh * d)),
        "w_up_kernel": 1e-3 * math.sqrt(3 / (hh * b)),
        "b_down_kernel": 1e-3 * math.sqrt(3 / hh),
        "b_up_kernel": 1e-3 * math.sqrt(3 / hh),
        "hidden_kernel": 1 / math.sqrt(128 + 10),
        "hidden_bias": 1 / math.sqrt(128 + 10),
    }
    for name, bound in bounds.items():
        v = np.abs(np.asarray(hn[name]))
        assert v.max() <= bound and v.max() > 0.9 * bound, name
    for name in ("w_down_bias", "b_down_bias", "w_up_bias", "b_up_bias"):
        assert not np.asarray(hn[name]).any()
    assert hn["w_down_kernel"].shape == (hh, d, b) and hn["w_up_kernel"].shape == (hh, b, d)
    assert p["expert_embedding"].shape == (n_l, n, 128)
    assert abs(float(np.std(p["expert_embedding"])) - 1.0) < 0.1
    assert p["layer_embedding"].shape == (n_l, 10)
    assert p["selection_w1"].shape == (n_l, 128, 128)
    assert np.abs(np.asarray(p["selection_w1"])).max() <= 1 / math.sqrt(128)
    # Logical axis names on every parameter.
    for _, leaf in jax.tree.flatten_with_path(
        variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)
    )[0]:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert len(leaf.names) == leaf.value.ndim
    out = gen.apply(variables)
    assert out["w_down"].shape == (n_l, n, d, b) and out["w_up"].shape == (n_l, n, b, d)
    assert out["b_down"].shape == (n_l, n, b) and out["b_up"].shape == (n_l, n, d)

    gen2 = hyper_experts.HyperExpertGenerator(
        num_layers=n_l, num_experts=8, num_selected=2, d_model=d,
        config=HyperExpertsConfig(bottleneck_dim=b))
    out2 = gen2.apply(gen2.init(jax.random.PRNGKey(0)))
    assert out2["w_down"].shape == (n_l, 28, d, b)
    gen3 = hyper_experts.HyperExpertGenerator(
        num_layers=n_l, num_experts=8, num_selected=2, d_model=d,
        config=HyperExpertsConfig(bottleneck_dim=b, max_sets=16))
    out3 = gen3.apply(gen3.init(jax.random.PRNGKey(0)))
    assert set(out3) == set(hyper_experts.PER_TOKEN_KEYS)
    assert all(v.shape[0] == n_l for v in out3.values())


def test_errors_say_what_to_do():
    x = jnp.zeros((2, 8, D_MODEL))
    experts = ExpertsConfig(num_experts=4, hidden_dim=8)
    layer = variants.SparseMlp(variants.moe_config("hypermoe", experts=experts))
    with pytest.raises(ValueError, match="hyper_inputs"):
        layer.init(jax.random.PRNGKey(0), x)
    with pytest.raises(ValueError, match="Unknown variant"):
        variants.moe_config("nope", experts=experts)
    with pytest.raises(ValueError, match="num_selected=1"):
        variants.moe_config("hypermoe", experts=experts, router=RouterConfig(num_selected=2),
                            hyper_experts=HyperExpertsConfig(placement="fused"))
    with pytest.raises(ValueError, match="some experts must stay unselected"):
        variants.moe_config("hypermoe", experts=experts, router=RouterConfig(num_selected=4))
    with pytest.raises(ValueError, match="uses a 'linear' router but RouterConfig.kind is"):
        variants.moe_config("hypermoe", experts=experts, router=RouterConfig(kind="hyper"))
