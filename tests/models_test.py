"""T5X-protocol models: losses, aux losses and metrics, params/frozen, k schedule, overfitting."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from helpers import tiny_moe

from hypermoe_jax import architectures as arch
from hypermoe_jax import losses, models
from hypermoe_jax.architectures import sizes

VOCAB = 32


def tiny(variant="switch", *, num_layers=2, sparse_step=2, num_selected=1, dropout_rate=0.0,
         **moe):
    return sizes.sparse_t5(
        "tiny", tiny_moe(variant, num_selected=num_selected, **moe), sparse_step=sparse_step,
        vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2, head_dim=8,
        dropout_rate=dropout_rate, num_encoder_layers=num_layers, num_decoder_layers=num_layers,
    )


def make_batch(batch=4, length=8, seed=0):
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    dec = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    enc[0, -3:] = 0
    dec[1, -2:] = 0
    din = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": jnp.asarray(enc),
        "decoder_input_tokens": jnp.asarray(din),
        "decoder_target_tokens": jnp.asarray(dec),
        "decoder_loss_weights": jnp.asarray((dec > 0).astype(np.float32)),
    }


def init(model, batch, seed=0):
    shapes = {k: v.shape for k, v in batch.items()}
    with jax.threefry_partitionable(False):  # 3x faster to compile on CPU
        variables = jax.jit(lambda r: nn.unbox(model.get_initial_variables(r, shapes)))(
            jax.random.PRNGKey(seed)
        )
    variables = dict(variables)
    return variables.pop("params"), variables


# --------------------------------------------------------------------------------------------
# Loss functions
# --------------------------------------------------------------------------------------------


def test_cross_entropy_label_smoothing_and_z_loss():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (3, 5))
    for ls, zl in [(0.0, 0.0), (0.1, 0.0), (0.2, 1e-2)]:
        loss, z = losses.cross_entropy_with_logits(jnp.asarray(logits), jnp.asarray(targets),
                                                   ls, zl)
        # KL(soft || softmax(logits)) + zl * logZ^2, straight from the definitions.
        soft = np.full((3, 5, 7), ls / 6)
        np.put_along_axis(soft, targets[..., None], 1 - ls, axis=-1)
        log_z = np.log(np.exp(logits).sum(-1))
        log_p = logits - log_z[..., None]
        ent = np.where(soft > 0, soft * np.log(np.maximum(soft, 1e-30)), 0).sum(-1)
        want = ent - (soft * log_p).sum(-1) + zl * log_z**2
        np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z, zl * log_z**2, rtol=1e-5, atol=1e-8)


def test_loss_normalizing_factors_weights_and_score_batch():
    cfg = sizes.t5_1_1("tiny", vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2,
                         head_dim=8, num_encoder_layers=1, num_decoder_layers=1,
                         dropout_rate=0.0)
    module = arch.EncoderDecoder(cfg)
    batch = make_batch()
    weights = np.asarray(batch["decoder_loss_weights"]).copy()
    weights[2, :3] = 0.0  # per-token weights
    batch["decoder_loss_weights"] = jnp.asarray(weights)
    params, mutables = init(models.EncoderDecoderModel(module), batch)

    def loss(**kw):
        model = models.EncoderDecoderModel(module, z_loss=0.0, **kw)
        return float(jax.jit(lambda p: model.eval_fn(p, batch, flax_mutables=mutables)[0])(
            params))

    scores, inter = jax.jit(lambda p: models.EncoderDecoderModel(module).score_batch(
        p, batch, return_intermediates=True))(params)
    total = -float(jnp.sum(scores))
    np.testing.assert_allclose(loss(loss_normalizing_factor=None), total, rtol=1e-5)
    np.testing.assert_allclose(loss(loss_normalizing_factor=10.0), total / 10, rtol=1e-5)
    np.testing.assert_allclose(loss(), total / weights.sum(), rtol=1e-5)  # NUM_REAL_TARGET_TOKENS
    # bits_per_token: the weighted NLL per token in bits, untouched by label smoothing / z-loss.
    smoothed = models.EncoderDecoderModel(module, label_smoothing=0.1, z_loss=1e-2,
                                          loss_normalizing_factor=None)
    _, m = jax.jit(lambda p: smoothed.eval_fn(p, batch, flax_mutables=mutables))(params)
    np.testing.assert_allclose(m["bits_per_token"], total / weights.sum() / np.log(2), rtol=1e-5)
    per_seq = -np.asarray(inter["token_scores"]).sum(-1) / weights.sum(-1)
    np.testing.assert_allclose(loss(loss_normalizing_factor="AVERAGE_PER_SEQUENCE"),
                               per_seq.sum() / 4, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        models.EncoderDecoderModel(module, loss_normalizing_factor="PER_TOKEN")


# --------------------------------------------------------------------------------------------
# MoE aux losses, metrics, frozen variables, k
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hyperrouter():
    cfg = tiny("hyperrouter", num_layers=4, num_selected=2, jitter_noise=0.1)
    model = models.EncoderDecoderModel(arch.EncoderDecoder(cfg),
                                       k_schedule=models.KSchedule(total_steps=100, k_min=1))
    batch = make_batch()
    params, mutables = init(model, batch)
    # One compiled training step (loss, metrics, grads) serves the tests below.
    loss_grad = jax.jit(jax.value_and_grad(model.loss_fn, has_aux=True))

    def loss_fn(*args, **kwargs):
        return loss_grad(*args, **kwargs)[0]

    return model, batch, params, mutables, loss_fn, loss_grad


def test_aux_losses_are_added_and_metrics_reported(hyperrouter):
    model, batch, params, mutables, loss_fn, loss_grad = hyperrouter
    loss, m = loss_fn(params, batch, jax.random.PRNGKey(0), flax_mutables=mutables, step=100)
    want = (m["cross_ent_loss"] + m["z_loss"] + 0.01 * m["moe/load_balance_loss"]
            + 0.001 * m["moe/router_z_loss"])
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(m["loss"], loss)
    # Averaged over all MoE layers of both stacks (blocks 1 and 3 of each).
    layers = [f"moe/{s}/layer_{i}/" for s in ("encoder", "decoder") for i in (1, 3)]
    np.testing.assert_allclose(
        m["moe/load_balance_loss"], np.mean([m[p + "load_balance_loss"] for p in layers]),
        rtol=1e-6,
    )
    for p in layers:
        assert m[p + "expert_load"].shape == (4,)
        np.testing.assert_allclose(float(jnp.sum(m[p + "expert_load"])), 1.0, rtol=1e-5)
        for name in ("dropped_fraction", "router_entropy", "router_confidence"):
            assert m[p + name].shape == ()
    assert not any(k.startswith("moe/encoder/layer_0") for k in m)
    # The same metrics as clu Averages (what upstream T5X trainers merge and compute).
    clu_model = models.EncoderDecoderModel(model.module, k_schedule=model.k_schedule,
                                           clu_metrics=True)
    _, cm = jax.jit(clu_model.eval_fn)(params, batch, flax_mutables=mutables)
    _, em = jax.jit(model.eval_fn)(params, batch, flax_mutables=mutables)
    np.testing.assert_allclose(cm["loss"].compute(), em["loss"], rtol=1e-6)
    np.testing.assert_allclose(cm["moe/decoder/layer_3/expert_load/2"].compute(),
                               em["moe/decoder/layer_3/expert_load"][2], rtol=1e-6)


def test_frozen_collection_scheme(hyperrouter):
    model, batch, params, mutables, loss_fn, loss_grad = hyperrouter
    assert set(mutables) == {"frozen"} and "frozen" not in params
    rng = jax.random.PRNGKey(0)
    (a, _), grads = loss_grad(params, batch, rng, flax_mutables=mutables, step=3)
    b, _ = jax.jit(model.loss_fn)({"params": params, **mutables}, batch, rng, step=3)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # Only the router embedding r of HyperRouter trains; its hypernetwork is frozen.
    router = grads["encoder"]["layers"]["sparse"]["mlp"]["moe"]["router"]
    assert set(jax.tree.leaves(jax.tree.map(lambda _: 1, router))) == {1}
    assert list(router["hyper"]) == ["embedding"]
    assert float(jnp.abs(router["hyper"]["embedding"]).sum()) > 0
    with pytest.raises(ValueError, match="flax_mutables"):
        jax.eval_shape(lambda: model.loss_fn(params, batch, rng, step=3))


def test_k_schedule_any_k_eval_and_jitter(hyperrouter):
    model, batch, params, mutables, loss_fn, loss_grad = hyperrouter
    assert int(model.train_active_k(0)) == 1
    assert int(model.train_active_k(100)) == 2
    assert model.train_active_k(None) is None
    # A training call without the step cannot grow k: an error, not a silent run at k_max.
    with pytest.raises(ValueError, match="without the training step"):
        jax.eval_shape(lambda: model.loss_fn(params, batch, jax.random.PRNGKey(0),
                                             flax_mutables=mutables))
    # An explicit active_k needs no step; eval needs none either.
    jax.eval_shape(lambda: model.loss_fn(params, batch, jax.random.PRNGKey(0),
                                         flax_mutables=mutables, active_k=1))
    rng = jax.random.PRNGKey(0)
    _, m0 = loss_fn(params, batch, rng, flax_mutables=mutables, step=0)
    _, m1 = loss_fn(params, batch, rng, flax_mutables=mutables, step=100)
    assert float(m0["moe/active_k"]) == 1 and float(m1["moe/active_k"]) == 2
    eval_fn = jax.jit(model.eval_fn)
    e1, _ = eval_fn(params, batch, flax_mutables=mutables, active_k=1)
    e2, _ = eval_fn(params, batch, flax_mutables=mutables, active_k=2)
    e_all, _ = eval_fn(params, batch, flax_mutables=mutables)
    assert abs(float(e1) - float(e2)) > 1e-6
    np.testing.assert_allclose(e2, e_all, rtol=1e-6)  # None = all num_selected
    # Training draws router jitter from the `jitter` stream split off dropout_rng.
    _, ma = loss_fn(params, batch, jax.random.PRNGKey(1), flax_mutables=mutables, step=100)
    _, mb = loss_fn(params, batch, jax.random.PRNGKey(2), flax_mutables=mutables, step=100)
    _, mc = loss_fn(params, batch, jax.random.PRNGKey(2), flax_mutables=mutables, step=100)
    key = "moe/encoder/layer_1/router_entropy"
    assert float(ma[key]) != float(mb[key])
    assert float(mb[key]) == float(mc[key])


def test_every_parameter_has_logical_axes():
    model = models.EncoderDecoderModel(arch.EncoderDecoder(tiny("hypermoe", num_layers=4)))
    shapes = {k: v.shape for k, v in make_batch().items()}
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    leaves = jax.tree.leaves(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(leaf.names)


def test_feature_converters():
    import seqio

    assert models.EncoderDecoderModel.FEATURE_CONVERTER_CLS is seqio.EncDecFeatureConverter
    assert models.DecoderOnlyModel.FEATURE_CONVERTER_CLS is seqio.DecoderFeatureConverter


# --------------------------------------------------------------------------------------------
# Every variant overfits a tiny batch
# --------------------------------------------------------------------------------------------

OVERFIT_STEPS = 80
OVERFIT_BOUND = 0.6  # mean token cross entropy (nats); ln(32) = 3.47 at chance


@pytest.mark.parametrize("variant", ["switch", "hypermoe", "hyperrouter", "smoe_dropout",
                                     "moe_share"])
def test_variant_overfits_tiny_batch(variant):
    num_selected = 2 if variant in ("hyperrouter", "smoe_dropout") else 1
    schedule = (models.KSchedule(total_steps=OVERFIT_STEPS // 2, k_min=1)
                if num_selected == 2 else None)
    model = models.EncoderDecoderModel(
        arch.EncoderDecoder(tiny(variant, num_layers=1, sparse_step=1, num_selected=num_selected,
                               jitter_noise=0.01)),
        k_schedule=schedule,
    )
    batch = make_batch()
    params, mutables = init(model, batch)
    tx = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, t):
            p, opt = carry
            (loss, m), g = jax.value_and_grad(model.loss_fn, has_aux=True)(
                p, batch, jax.random.fold_in(jax.random.PRNGKey(0), t), flax_mutables=mutables,
                step=t,
            )
            updates, opt = tx.update(g, opt, p)
            return (optax.apply_updates(p, updates), opt), (loss, m["cross_ent_loss"])

        (p, _), (losses, ce) = jax.lax.scan(step, (params, tx.init(params)),
                                            jnp.arange(OVERFIT_STEPS))
        return p, losses, ce

    params, losses, ce = train(params)
    assert np.isfinite(np.asarray(losses)).all()
    assert float(ce[0]) > 2.5
    assert float(ce[-1]) < OVERFIT_BOUND, (variant, np.asarray(ce)[::10])
    eval_loss, m = jax.jit(lambda p: model.eval_fn(p, batch, flax_mutables=mutables))(params)
    assert float(m["accuracy"]) > 0.9
