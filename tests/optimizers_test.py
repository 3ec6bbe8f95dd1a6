"""Optimizers on scanned stacks: ``OptimizerDef.transform(param_axes)`` updates a scanned tree
exactly as the unrolled one (weight-decay mask and Adafactor statistics per layer), while the plain
``tx`` treats the layer axis as a parameter dimension."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import tiny_moe
from jax.sharding import PartitionSpec

from hypermoe_jax import architectures as arch
from hypermoe_jax import models
from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures import sizes, stacks
from hypermoe_jax.training import optimizers

SHAPES = {k: (2, 8) for k in ("encoder_input_tokens", "decoder_input_tokens",
                              "decoder_target_tokens", "decoder_loss_weights")}
STEPS = 3
WEIGHT_DECAY = 0.1

OPTIMIZERS = {
    # Global-norm clipping at 1.0 is active: the random gradients' norm is about 200.
    "adamw": dict(name="adamw", learning_rate=1e-2, weight_decay=WEIGHT_DECAY,
                  clip_grad_norm=1.0),
    # Factor every leaf with two dims >= 2: a [P, d] norm scale would be factored over [P, d].
    "adafactor": dict(name="adafactor", learning_rate=1e-2, weight_decay=WEIGHT_DECAY,
                      adafactor_multiply_by_parameter_scale=True,
                      adafactor_min_dim_size_to_factor=2),
}


@functools.cache
def tiny_model(scan_layers: bool):
    """HyperMoE encoder-decoder with 2 sparse layers per stack (P = 2 periods) and a shared
    hypernetwork with per-layer tables (``[P, ...]`` in both layouts); the parameters' shapes and
    logical axis names."""
    cfg = sizes.sparse_t5(
        "tiny", tiny_moe("hypermoe", 4), sparse_step=1, vocab_size=64, emb_dim=16, mlp_dim=32,
        num_heads=2, head_dim=8, dropout_rate=0.0, num_encoder_layers=2, num_decoder_layers=2,
        tied_embeddings=False, scan_layers=scan_layers, remat_policy="none")
    model = models.EncoderDecoderModel(arch.EncoderDecoder(cfg))
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), SHAPES))
    return nn.unbox(boxed)["params"], optimizers.logical_param_axes(boxed)


def random_tree(abstract, seed, kind):
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        x = rng.standard_normal(a.shape).astype(np.float32)
        if kind == "params" and jax.tree_util.keystr(path).endswith("['scale']"):
            x = 1.0 + 0.1 * x
        elif kind == "params":
            x = 0.25 * x
        return jnp.asarray(x)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.cache
def scanned_inputs():
    """Parameters and ``STEPS`` gradients of the scanned model: zero at step 0 (the update is
    the weight decay alone), random after."""
    abstract, _ = tiny_model(True)
    params = random_tree(abstract, 0, "params")
    grads = [jax.tree.map(jnp.zeros_like, params)]
    grads += [random_tree(abstract, 10 + s, "grads") for s in range(1, STEPS)]
    return params, grads


def run_steps(tx, params, grads):
    """``len(grads)`` optimizer steps; returns the updates of every step and the final params."""

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    all_updates = []
    for g in grads:
        params, state, updates = step(params, state, g)
        all_updates.append(updates)
    return all_updates, params


@functools.cache
def run(name: str, layout: str):
    """``OPTIMIZERS[name]`` for ``STEPS`` steps on the scanned model (``transform``, or the plain
    ``tx``: layout ``scanned_tx``) or on the unrolled one (``transform``; results stacked into
    the scanned layout), from the same parameters and gradients."""
    opt = optimizers.make_optimizer(**OPTIMIZERS[name])
    params, grads = scanned_inputs()
    if layout == "unrolled":
        _, axes = tiny_model(False)
        upd, final = run_steps(opt.transform(axes), stacks.unstack_layers(params),
                               [stacks.unstack_layers(g) for g in grads])
        return [stacks.stack_layers(u) for u in upd], stacks.stack_layers(final)
    _, axes = tiny_model(True)
    return run_steps(opt.transform(axes) if layout == "scanned" else opt.tx, params, grads)


def leaves(tree):
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    a, b = leaves(a), leaves(b)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


def axes_by_name(axes):
    return {jax.tree_util.keystr(k): tuple(a)
            for k, a in jax.tree_util.tree_flatten_with_path(axes)[0]}


def layer_scales(names):
    return [n for n in names if n.endswith("['scale']") and "['layers']" in n]


def test_tiny_model_layer_axes():
    """Every leaf of the scanned layers has the `layers` axis first (so do the generator's
    per-layer tables); stacking the unrolled tree gives the scanned shapes."""
    abstract_s, axes_s = tiny_model(True)
    abstract_u, _ = tiny_model(False)
    layered = {n for n, a in axes_by_name(axes_s).items() if optimizers.has_layer_axis(a)}
    names = leaves(jax.tree.map(lambda a: np.zeros(()), abstract_s))
    assert {n for n in names if "['layers']" in n} < layered
    assert "['encoder']['hyper_generator']['selection_b1']" in layered
    scales = [n for n in names if n.endswith("['scale']")]
    assert len(scales) == 7 and len(layer_scales(scales)) == 5
    assert set(layered) & set(scales) == set(layer_scales(scales))
    stacked_u = stacks.stack_layers(jax.tree.map(lambda a: np.zeros(a.shape), abstract_u))
    assert jax.tree.map(np.shape, stacked_u) == jax.tree.map(lambda a: a.shape, abstract_s)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_scanned_update_equals_unrolled_update(name):
    upd_s, final_s = run(name, "scanned")
    upd_u, final_u = run(name, "unrolled")
    for step, (u_s, u_u) in enumerate(zip(upd_s, upd_u)):
        assert all(np.isfinite(x).all() for x in leaves(u_s).values()), step
        assert_trees_close(u_s, u_u)
    assert_trees_close(final_s, final_u)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_norm_scales_and_biases_are_not_decayed_in_the_scanned_tree(name):
    """Step 0 has zero gradients: the update is the weight decay alone -- none for the norm
    scales and the per-layer biases (rank 1 per layer), ``-c * p`` for the matrices."""
    # AdamW's decay is scaled by the learning rate; optax's Adafactor adds it unscaled.
    c = WEIGHT_DECAY * (1e-2 if name == "adamw" else 1.0)
    params, _ = scanned_inputs()
    _, axes = tiny_model(True)
    upd, p = leaves(run(name, "scanned")[0][0]), leaves(params)
    rank = {n: len(a) - optimizers.has_layer_axis(a) for n, a in axes_by_name(axes).items()}
    undecayed = {n for n in upd if rank[n] <= 1}
    assert sum(n.endswith("['scale']") for n in undecayed) == 7
    assert {"['encoder']['hyper_generator']['selection_b1']",
            "['decoder']['hyper_generator']['selection_b2']",
            "['encoder']['hyper_generator']['hypernet']['hidden_bias']"} <= undecayed
    for n in upd:
        if n in undecayed:
            np.testing.assert_array_equal(upd[n], 0.0, err_msg=n)
        else:
            np.testing.assert_allclose(upd[n], -c * p[n], rtol=1e-5, atol=1e-8, err_msg=n)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_plain_tx_does_not_match_the_unrolled_update(name):
    """The old behaviour, ``tx`` on the scanned tree: its norm scales get another update than
    the unrolled ones (AdamW: decayed; Adafactor: also factored, clipped and scaled over all
    layers at once) at every step."""
    upd_tx, _ = run(name, "scanned_tx")
    upd_u, _ = run(name, "unrolled")
    for u_tx, u_u in zip(upd_tx, upd_u):
        u_tx, u_u = leaves(u_tx), leaves(u_u)
        assert len(layer_scales(u_tx)) == 5
        for n in layer_scales(u_tx):
            assert not np.allclose(u_tx[n], u_u[n], rtol=1e-4, atol=1e-6), n


def test_transform_without_layer_axes_is_tx_and_checks_the_tree():
    opt = optimizers.make_optimizer(**OPTIMIZERS["adafactor"])
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
              "norm": {"scale": jnp.ones((3,), jnp.float32)}}
    grads = [jax.tree.map(lambda x, s=s: x * (s + 1.5), params) for s in range(STEPS)]
    axes = {"w": PartitionSpec(part.EMBED, part.MLP), "norm": {"scale": None}}
    upd_t, final_t = run_steps(opt.transform(axes), params, grads)
    upd_p, final_p = run_steps(opt.tx, params, grads)
    assert_trees_close(upd_t, upd_p, rtol=0, atol=0)
    assert_trees_close(final_t, final_p, rtol=0, atol=0)
    tx = opt.transform({"w": (part.LAYERS, part.EMBED)})
    with pytest.raises(ValueError, match="do not match the parameter axes"):
        tx.init(params)
    with pytest.raises(ValueError, match="per-leaf"):
        optimizers.OptimizerDef(tx=opt.tx, learning_rate=opt.learning_rate).transform(axes)
