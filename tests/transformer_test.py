"""Transformer stacks: scanned == unrolled, the shared hypernetwork, packing, relative positions,
8-device mesh == one device."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import HYPER_SMALL, tiny_moe

from hypermoe_jax import architectures as arch
from hypermoe_jax import models
from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures import attention, sizes, stacks
from hypermoe_jax.architectures import config as arch_config
from hypermoe_jax.layers import hyper_experts

VOCAB = 64


def tiny_config(variant="switch", *, scan_layers=True, remat_policy="none", num_experts=4,
                num_selected=1, sparse_step=2, num_layers=4):
    moe = tiny_moe(variant, num_experts, num_selected=num_selected,
                   eval_capacity_factor=float(num_experts),
                   train_capacity_factor=float(num_experts))
    return sizes.sparse_t5(
        "tiny", moe, sparse_step=sparse_step,
        vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2, head_dim=8, dropout_rate=0.0,
        num_encoder_layers=num_layers, num_decoder_layers=num_layers, tied_embeddings=False,
        scan_layers=scan_layers, remat_policy=remat_policy,
    )


def make_batch(batch=2, length=8, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    dec = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    enc[:, -2:] = 0  # some padding
    dec[0, -1] = 0
    din = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": jnp.asarray(enc),
        "decoder_input_tokens": jnp.asarray(din),
        "decoder_target_tokens": jnp.asarray(dec),
        "decoder_loss_weights": jnp.asarray((dec > 0).astype(np.float32)),
    }


def init_variables(model, batch, seed=0):
    """The model's own initialisation (``jax_threefry_partitionable`` off: 3x faster to compile
    on CPU)."""
    shapes = {k: v.shape for k, v in batch.items()}
    with jax.threefry_partitionable(False):
        init = jax.jit(lambda r: nn.unbox(model.get_initial_variables(r, shapes)))
        variables = dict(init(jax.random.PRNGKey(seed)))
    return variables.pop("params"), variables


def random_variables(model, batch, seed=0):
    """Random weights of the right shapes without compiling an initialiser: N(0, 1/16) matrices,
    N(0, 1) embeddings, norm scales near 1. Equality tests need no particular init."""
    shapes = {k: v.shape for k, v in batch.items()}
    abstract = jax.eval_shape(
        lambda: nn.unbox(model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    )
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        x = rng.standard_normal(a.shape).astype(np.float32)
        if name.endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * x)
        if "embedding" in name:
            return jnp.asarray(x)
        return jnp.asarray(x * (0.25 if a.ndim >= 2 else 0.1))

    variables = dict(jax.tree_util.tree_map_with_path(leaf, abstract))
    return variables.pop("params"), variables


def loss_and_grad(model, params, mutables, batch, step=7):
    def f(p):
        return model.loss_fn(p, batch, jax.random.PRNGKey(1), flax_mutables=mutables, step=step)

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


# --------------------------------------------------------------------------------------------
# Relative position buckets
# --------------------------------------------------------------------------------------------


def _reference_bucket(rel, bidirectional, num_buckets, max_distance):
    """Scalar transcription of the T5 bucket rule."""
    n = -rel
    ret = 0
    if bidirectional:
        num_buckets //= 2
        if n < 0:
            ret += num_buckets
        n = abs(n)
    else:
        n = max(n, 0)
    max_exact = num_buckets // 2
    if n < max_exact:
        return ret + n
    val = max_exact + int(
        math.log(n / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    )
    return ret + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_scalar_rule(bidirectional):
    rel = np.arange(-300, 301)
    got = attention.RelativePositionBias.bucket(jnp.asarray(rel), bidirectional, 32, 128)
    want = [_reference_bucket(int(r), bidirectional, 32, 128) for r in rel]
    np.testing.assert_array_equal(np.asarray(got), want)


# --------------------------------------------------------------------------------------------
# Scanned == unrolled
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["switch", "hypermoe", "hyperrouter", "smoe_dropout"])
def test_scanned_equals_unrolled_loss_and_grads(variant):
    # Switch: dense + sparse periods with remat on one side; the others: 2 MoE layers per stack.
    sizes = dict(sparse_step=2, num_layers=4) if variant == "switch" else dict(
        sparse_step=1, num_layers=2)
    num_selected = 2 if variant in ("hyperrouter", "smoe_dropout") else 1
    schedule = models.KSchedule(total_steps=10, k_min=1) if variant == "smoe_dropout" else None
    batch = make_batch()
    scanned = models.EncoderDecoderModel(
        arch.EncoderDecoder(tiny_config(variant, num_selected=num_selected, **sizes)),
        k_schedule=schedule,
    )
    unrolled = models.EncoderDecoderModel(
        arch.EncoderDecoder(tiny_config(variant, num_selected=num_selected, scan_layers=False,
                                      remat_policy="full" if variant == "switch" else "none",
                                      **sizes)),
        k_schedule=schedule,
    )
    params, mutables = random_variables(scanned, batch)
    if variant in ("hyperrouter", "smoe_dropout"):
        assert set(mutables) == {"frozen"}
        # Frozen router weights are stacked over the scanned layers, like params.
        for leaf in jax.tree.leaves(mutables["frozen"]["encoder"]["layers"]):
            assert leaf.shape[0] == 2
    (loss_s, m_s), g_s = loss_and_grad(scanned, params, mutables, batch)
    (loss_u, m_u), g_u = loss_and_grad(
        unrolled, stacks.unstack_layers(params), stacks.unstack_layers(mutables), batch
    )
    assert np.isfinite(loss_s)
    np.testing.assert_allclose(loss_s, loss_u, rtol=1e-6)
    last = sizes["num_layers"] - 1
    for key in ("moe/load_balance_loss", "moe/router_z_loss",
                f"moe/decoder/layer_{last}/expert_load"):
        np.testing.assert_allclose(m_s[key], m_u[key], rtol=1e-5, atol=1e-7)
    assert_trees_close(g_s, stacks.stack_layers(g_u), rtol=1e-4, atol=1e-6)
    if variant == "smoe_dropout":
        assert int(m_s["moe/active_k"]) == 2  # round((2 - 1) * 7 / 10) + 1


def test_stack_unstack_roundtrip_and_layer_axis_metadata():
    model = arch.EncoderDecoder(tiny_config("switch"))
    batch = make_batch()
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), batch["encoder_input_tokens"],
                           batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                           enable_dropout=False)
    )
    specs = nn.get_partition_spec(boxed)["params"]
    # The scan adds the `layers` logical axis in front of every per-layer parameter.
    wi = specs["encoder"]["layers"]["sparse"]["mlp"]["moe"]["experts"]["wi_0"]
    assert tuple(wi) == (part.LAYERS, part.EXPERTS, part.EMBED, part.EXPERT_MLP)
    params = jax.tree.map(lambda s: np.random.rand(*s.shape).astype(np.float32),
                          nn.unbox(boxed)["params"])
    unrolled = stacks.unstack_layers(params)
    assert "layers_1" in unrolled["decoder"] and "layers" not in unrolled["decoder"]
    assert_trees_close(stacks.stack_layers(unrolled), params, rtol=0, atol=0)


def test_sparse_step_validation_and_layout():
    assert arch.sparse_layer_indices(12, 2) == [1, 3, 5, 7, 9, 11]
    assert arch.sparse_layer_indices(12, 3) == [2, 5, 8, 11]
    assert arch.sparse_layer_indices(12, 0) == []
    assert arch_config.num_periods(12, None) == 12
    with pytest.raises(ValueError, match="sparse_step"):
        arch_config.num_periods(12, 5)
    with pytest.raises(ValueError, match="MoeConfig"):
        arch.TransformerConfig(vocab_size=8, encoder_sparse_step=2)
    with pytest.raises(ValueError, match="remat_policy"):
        arch.TransformerConfig(vocab_size=8, remat_policy="some")


def test_dense_config_has_no_moe_and_dots_remat_runs():
    cfg = sizes.t5_1_1("tiny", vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2,
                         head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                         remat_policy="dots", dropout_rate=0.1)
    model = models.EncoderDecoderModel(arch.EncoderDecoder(cfg))
    batch = make_batch()
    params, mutables = random_variables(model, batch)
    (loss, metrics), grads = loss_and_grad(model, params, mutables, batch)
    assert np.isfinite(loss) and float(metrics["moe/load_balance_loss"]) == 0.0
    assert not any(k.startswith("moe/encoder") for k in metrics)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------
# The shared hypernetwork
# --------------------------------------------------------------------------------------------


def _hypermoe_model(num_layers=4):
    return models.EncoderDecoderModel(arch.EncoderDecoder(tiny_config("hypermoe",
                                                                    num_layers=num_layers)))


def test_hypernetwork_is_one_set_of_weights_per_stack():
    batch = make_batch()
    shapes = {}
    for num_layers in (2, 4, 6):
        params = jax.eval_shape(
            lambda n=num_layers: _hypermoe_model(n).get_initial_variables(
                jax.random.PRNGKey(0), {k: v.shape for k, v in batch.items()})
        )["params"]
        params = nn.unbox(params)
        shapes[num_layers] = params
        for stack in ("encoder", "decoder"):
            gen = params[stack]["hyper_generator"]
            moe_layers = num_layers // 2
            # Per-layer tables carry the layer axis ...
            assert gen["expert_embedding"].shape[0] == moe_layers
            assert gen["layer_embedding"].shape[0] == moe_layers
            # ... and nothing of the generator lives inside the scanned layers.
            layers = str(jax.tree_util.tree_structure(params[stack]["layers"]))
            assert "hyper_generator" not in layers
    # The hypernetwork's leaves do not depend on the number of layers: no layer axis.
    hyper_shapes = [jax.tree.map(lambda a: a.shape, p["encoder"]["hyper_generator"]["hypernet"])
                    for p in shapes.values()]
    assert hyper_shapes[0] == hyper_shapes[1] == hyper_shapes[2]
    enc = shapes[4]["encoder"]["hyper_generator"]["hypernet"]
    dec = shapes[4]["decoder"]["hyper_generator"]["hypernet"]
    assert jax.tree.map(lambda a: a.shape, enc) == jax.tree.map(lambda a: a.shape, dec)


def test_hypernetwork_gets_gradient_from_every_layer():
    """Per-MoE-layer gradient contributions to the shared hypernetwork: the cotangent of the
    generator output (one backward pass of the model, through the scan) split by layer and pulled
    back through the generator separately; the contributions must be nonzero and add up to the
    model's gradient of the hypernetwork."""
    model = models.EncoderDecoderModel(arch.EncoderDecoder(tiny_config(
        "hypermoe", sparse_step=1, num_layers=2)))
    batch = make_batch()
    params, mutables = random_variables(model, batch)
    cfg = model.config
    gen = hyper_experts.HyperExpertGenerator(num_layers=2, num_experts=cfg.moe.num_experts,
                                             num_selected=1, d_model=cfg.emb_dim,
                                             config=HYPER_SMALL)

    def generate(gen_params):
        return gen.apply({"params": gen_params})

    stacks = ("encoder", "decoder")
    zeros = {s: jax.tree.map(jnp.zeros_like, generate(params[s]["hyper_generator"]))
             for s in stacks}

    def loss(p, delta):
        def add_delta(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if isinstance(context.module, hyper_experts.HyperExpertGenerator) and (
                context.method_name == "__call__"
            ):
                out = jax.tree.map(jnp.add, out, delta[context.module.path[0]])
            return out

        with nn.intercept_methods(add_delta):
            return model.loss_fn(p, batch, None, flax_mutables=mutables)[0]

    g_params, g_out = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, zeros)

    @jax.jit
    def contributions(gen_params, cotangent):
        _, pullback = jax.vjp(generate, gen_params)
        per_layer = []
        for m in range(2):
            masked = jax.tree.map(lambda c, m=m: c.at[1 - m].set(0.0), cotangent)
            per_layer.append(pullback(masked)[0])
        return per_layer

    for stack in stacks:
        per_layer = contributions(params[stack]["hyper_generator"], g_out[stack])
        hnet = [g["hypernet"] for g in per_layer]
        for m, g in enumerate(hnet):
            norm = sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g))
            assert norm > 0, f"{stack} MoE layer {m} sends no gradient to the hypernetwork"
        total = jax.tree.map(jnp.add, *hnet)
        assert_trees_close(total, g_params[stack]["hyper_generator"]["hypernet"], rtol=1e-4,
                           atol=1e-8)
        # Layer m's expert embeddings get gradient from layer m only.
        for m in range(2):
            emb = per_layer[m]["expert_embedding"]
            assert float(jnp.abs(emb[m]).sum()) > 0
            assert float(jnp.abs(emb[1 - m]).sum()) == 0


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def test_packed_inputs_match_separate_sequences():
    cfg = tiny_config("hypermoe", sparse_step=1, num_layers=2)
    model = arch.EncoderDecoder(cfg)
    rng = np.random.default_rng(3)
    length = 8
    enc_a, enc_b = rng.integers(2, VOCAB, 3), rng.integers(2, VOCAB, 4)
    dec_a, dec_b = rng.integers(2, VOCAB, 4), rng.integers(2, VOCAB, 3)

    def pad(x):
        return np.pad(x, (0, length - len(x)))

    def shift(x):
        return np.concatenate([[0], x[:-1]])

    separate = {
        "encoder_input_tokens": np.stack([pad(enc_a), pad(enc_b)]),
        "decoder_input_tokens": np.stack([pad(shift(dec_a)), pad(shift(dec_b))]),
        "decoder_target_tokens": np.stack([pad(dec_a), pad(dec_b)]),
    }
    packed = {
        "encoder_input_tokens": pad(np.concatenate([enc_a, enc_b]))[None],
        "decoder_input_tokens": pad(np.concatenate([shift(dec_a), shift(dec_b)]))[None],
        "decoder_target_tokens": pad(np.concatenate([dec_a, dec_b]))[None],
        "encoder_segment_ids": pad(np.array([1] * 3 + [2] * 4))[None],
        "decoder_segment_ids": pad(np.array([1] * 4 + [2] * 3))[None],
        "encoder_positions": pad(np.concatenate([np.arange(3), np.arange(4)]))[None],
        "decoder_positions": pad(np.concatenate([np.arange(4), np.arange(3)]))[None],
    }
    separate = {k: jnp.asarray(v, jnp.int32) for k, v in separate.items()}
    packed = {k: jnp.asarray(v, jnp.int32) for k, v in packed.items()}
    params, _ = random_variables(models.EncoderDecoderModel(model), make_batch())
    variables = {"params": params}

    @jax.jit
    def logits(batch):
        return model.apply(variables, **batch, enable_dropout=False)[0]

    sep, pk = logits(separate), logits(packed)
    np.testing.assert_allclose(pk[0, :4], sep[0, :4], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(pk[0, 4:7], sep[1, :3], rtol=2e-5, atol=2e-5)


# --------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------


def test_mesh_2x4x1_matches_one_device():
    model = models.EncoderDecoderModel(arch.EncoderDecoder(tiny_config(
        "hypermoe", sparse_step=1, num_layers=1)))
    batch = make_batch(batch=8)
    params, mutables = random_variables(model, batch)

    def loss_grad(p, b):
        return jax.value_and_grad(
            lambda q: model.loss_fn(q, b, jax.random.PRNGKey(1), flax_mutables=mutables),
            has_aux=True,
        )(p)

    (loss_1, metrics_1), grads_1 = jax.jit(loss_grad)(params, batch)

    mesh = part.make_mesh(2, 4, 1)
    shapes = {k: v.shape for k, v in batch.items()}
    with part.axis_rules(mesh):
        boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
        shardings = part.params_shardings(mesh, boxed)["params"]
        sharded_params = jax.device_put(params, shardings)
        sharded_batch = jax.device_put(
            batch, part.logical_sharding(mesh, (part.BATCH, part.LENGTH))
        )
        lowered = jax.jit(loss_grad).lower(sharded_params, sharded_batch)
        (loss_8, metrics_8), grads_8 = lowered.compile()(sharded_params, sharded_batch)
    # Expert weights are split over the `expert` axis and the experts run expert-parallel.
    wi = sharded_params["encoder"]["layers"]["sparse"]["mlp"]["moe"]["experts"]["wi_0"]
    assert wi.sharding.spec[1] == part.EXPERT
    assert "all_to_all" in lowered.as_text()
    np.testing.assert_allclose(loss_8, loss_1, rtol=1e-5)
    np.testing.assert_allclose(metrics_8["moe/encoder/layer_0/expert_load"],
                               metrics_1["moe/encoder/layer_0/expert_load"], rtol=1e-6)
    assert_trees_close(jax.device_get(grads_8), grads_1, rtol=1e-4, atol=1e-6)
