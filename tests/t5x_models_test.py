"""``hypermoe_jax.t5x_support``: the T5X protocol checked with T5X's own code (train state,
Adafactor, the trainer's gradient accumulation and train step, the vocabulary check, the MoE
partitioner's axes), in process. ``t5x_binaries_test.py`` runs the binaries."""

import functools
import inspect

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clu import metrics as clu_metrics
from helpers import import_t5x, tiny_moe

import_t5x()

import seqio  # noqa: E402
from t5x import adafactor, trainer, utils  # noqa: E402
from t5x import train_state as train_state_lib  # noqa: E402

import tasks  # noqa: E402,F401  (registers the tasks)
from hypermoe_jax import architectures as arch  # noqa: E402
from hypermoe_jax import models  # noqa: E402
from hypermoe_jax import partitioning as part  # noqa: E402
from hypermoe_jax.architectures import sizes  # noqa: E402
from hypermoe_jax.layers.routing import linear_k_schedule  # noqa: E402
from hypermoe_jax.t5x_support import models as t5x_models  # noqa: E402
from hypermoe_jax.t5x_support import partitioning as t5x_partitioning  # noqa: E402

VOCAB = 32
VARIANTS = ["switch", "hypermoe", "hyperrouter", "smoe_dropout", "moe_share"]


def tiny_model(variant, *, k_schedule=None, num_selected=1, vocabulary=None):
    """A decoder-only LM of 2 blocks (the second sparse): the protocol does not depend on the
    architecture, and this is the cheapest model to compile."""
    cfg = sizes.decoder_only("lm_tiny", tiny_moe(variant, num_selected=num_selected),
                             num_decoder_layers=2, vocab_size=VOCAB, emb_dim=16, mlp_dim=32,
                             num_heads=2, head_dim=8, dropout_rate=0.0)
    return models.DecoderOnlyModel(arch.DecoderOnly(cfg), k_schedule=k_schedule,
                                   input_vocabulary=vocabulary, output_vocabulary=vocabulary)


def optimizer():
    return adafactor.Adafactor(decay_rate=0.8, step_offset=0,
                               logical_factor_rules=t5x_models.logical_factor_rules())


def make_batch(batch=4, length=8, seed=0):
    rng = np.random.default_rng(seed)
    dec = rng.integers(2, VOCAB, (batch, length)).astype(np.int32)
    dec[1, -2:] = 0
    din = np.concatenate([np.zeros((batch, 1), np.int32), dec[:, :-1]], axis=1)
    return {"decoder_input_tokens": jnp.asarray(din), "decoder_target_tokens": jnp.asarray(dec),
            "decoder_loss_weights": jnp.asarray((dec > 0).astype(np.int32))}


def initial_variables(model, batch):
    shapes = {k: v.shape for k, v in batch.items()}
    with jax.threefry_partitionable(False):
        return jax.jit(lambda r: model.get_initial_variables(r, shapes))(jax.random.PRNGKey(0))


# --------------------------------------------------------------------------------------------
# Variables, axes, Adafactor, partitioner axes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_variables_axes_adafactor_and_partitioner_axes(variant):
    sched = models.KSchedule(total_steps=8) if variant in ("hyperrouter", "smoe_dropout") else None
    model = t5x_models.T5XModel(tiny_model(variant, k_schedule=sched, num_selected=2),
                                optimizer(), batch_size=4)
    variables = initial_variables(model, make_batch())
    collections = {k for k in variables if not k.endswith("_axes")}
    # Every collection has its axes twin (T5X partitions flax_mutables by them).
    assert {k + "_axes" for k in collections} == {k for k in variables if k.endswith("_axes")}
    frozen = {"frozen"} if variant in ("hyperrouter", "smoe_dropout") else set()
    counter = {t5x_models.K_SCHEDULE} if sched else set()
    assert collections == {"params"} | frozen | counter
    # T5X's train state validates params_axes against params, and Adafactor's factor rules
    # (incomplete specs raise) cover every logical axis name.
    state = train_state_lib.FlaxOptimTrainState.create(optimizer(), variables)
    assert set(state.flax_mutables) == frozen | counter
    names = jax.tree.leaves(state.as_logical_axes().params,
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert any(part.EXPERTS in tuple(n) for n in names)

    partitioner = t5x_partitioning.ExpertPartitioner(num_expert_partitions=4)
    axes = partitioner.get_logical_axes(state)
    flat_params = _flatten(state.params)
    flat_axes = _flatten(axes.params)
    states = _flatten(state._optimizer.state_dict()["state"]["param_states"])
    state_axes = _flatten(axes._optimizer.state_dict()["state"]["param_states"])
    checked = 0
    for path, spec in flat_axes.items():
        if part.EXPERTS not in tuple(spec):
            continue
        e = tuple(spec).index(part.EXPERTS)
        for key in ("v_row", "v_col"):
            s = states[f"{path}/{key}"]
            if s.shape == (1,):
                continue
            got = tuple(state_axes[f"{path}/{key}"])
            assert len(got) == s.ndim, (path, key, got, s.shape)
            # The factored moment keeps the expert dim, sharded like its parameter.
            assert s.shape[got.index(part.EXPERTS)] == flat_params[path].shape[e]
            checked += 1
    assert checked > 0
    # The mesh axes of the whole train state resolve (ranks and names agree).
    partitioner.get_mesh_axes(state)


def _flatten(tree) -> dict:
    from flax import core, traverse_util

    return traverse_util.flatten_dict(core.unfreeze(tree), sep="/")


# --------------------------------------------------------------------------------------------
# loss_fn / eval_fn under T5X's trainer, the step counter
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoe_dropout():
    sched = models.KSchedule(total_steps=3, k_min=1)
    inner = tiny_model("smoe_dropout", k_schedule=sched, num_selected=4)
    model = t5x_models.T5XModel(inner, optimizer(), batch_size=4)
    batch = make_batch()
    variables = initial_variables(model, batch)
    state = train_state_lib.FlaxOptimTrainState.create(optimizer(), variables)
    return model, batch, state


def test_loss_fn_protocol_counter_and_metrics(smoe_dropout):
    model, batch, state = smoe_dropout
    rng = jax.random.PRNGKey(3)
    params, mutables = state.params, state.flax_mutables
    assert int(mutables[t5x_models.K_SCHEDULE]["step"]) == 0
    loss, (metrics, new) = jax.jit(model.loss_fn)(params, batch, rng, mutables)
    assert type(new) is type(mutables)
    assert int(new[t5x_models.K_SCHEDULE]["step"]) == 1
    assert int(new[t5x_models.K_SCHEDULE]["rows"]) == 0
    jax.tree.map(np.testing.assert_array_equal, new["frozen"], mutables["frozen"])
    assert all(isinstance(m, clu_metrics.Metric) for m in metrics.values())
    for name in ("timing/steps_per_second", "timing/seqs_per_second", "loss",
                 "loss_per_nonpadding_target_token", "accuracy", "cross_ent_loss",
                 "moe/load_balance_loss", "moe/decoder/layer_1/expert_load/3"):
        assert name in metrics, name
    assert float(metrics["moe/active_k"].compute()) == 1.0
    # The same loss as the wrapped model at step 0.
    frozen = {"frozen": mutables["frozen"]}
    want, _ = jax.jit(functools.partial(model.model.loss_fn, step=0))(
        params, batch, rng, flax_mutables=frozen)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    # A counter at step 2 trains with k = linear_k_schedule(2).
    at2 = {**mutables, t5x_models.K_SCHEDULE: {"step": jnp.int32(2), "rows": jnp.int32(0)}}
    _, (m2, _) = jax.jit(model.loss_fn)(params, batch, rng, at2)
    assert float(m2["moe/active_k"].compute()) == float(linear_k_schedule(2, 3, 1, 4))
    # Evaluation: (loss, metrics), the eval settings, the counter untouched.
    eloss, emetrics = jax.jit(model.eval_fn)(params, batch, mutables)
    want_eval, _ = jax.jit(model.model.eval_fn)(params, batch, flax_mutables=frozen)
    np.testing.assert_allclose(eloss, want_eval, rtol=1e-6)
    assert "timing/steps_per_second" in emetrics


def test_t5x_train_steps_grow_k_with_microbatches(smoe_dropout):
    """T5X's own train step (gradient accumulation over 2 microbatches of 2 rows): the model's
    step advances once per step and k follows the schedule 1, 2, 3 (k_max 4 at step 3)."""
    model, batch, state = smoe_dropout
    step_fn = jax.jit(functools.partial(trainer.train_with_lr, learning_rate=jnp.float32(0.01),
                                        model=model, num_microbatches=2))
    ks = []
    for i in range(3):
        state, metrics = step_fn(state, batch, dropout_rng=jax.random.PRNGKey(i))
        assert int(state.step) == i + 1
        assert int(state.flax_mutables[t5x_models.K_SCHEDULE]["step"]) == i + 1
        ks.append(float(metrics["moe/active_k"].compute()))
    assert ks == [float(linear_k_schedule(t, 3, 1, 4)) for t in range(3)]
    assert ks[0] < ks[-1]


def test_training_without_the_step_fails_loudly(smoe_dropout):
    model, batch, state = smoe_dropout
    rng = jax.random.PRNGKey(0)
    no_counter = {"frozen": state.flax_mutables["frozen"]}
    with pytest.raises(ValueError, match="k_schedule"):
        jax.eval_shape(lambda: model.loss_fn(state.params, batch, rng, no_counter))
    unsized = t5x_models.T5XModel(model.model, optimizer(), batch_size=None)
    with pytest.raises(ValueError, match="batch_size = %BATCH_SIZE"):
        jax.eval_shape(lambda: unsized.loss_fn(state.params, batch, rng, state.flax_mutables))
    # Without a k schedule, T5X's plain call (no flax_mutables) gives (loss, metrics).
    switch = t5x_models.T5XModel(tiny_model("switch"), optimizer())
    variables = initial_variables(switch, batch)
    loss, metrics = jax.eval_shape(lambda: switch.loss_fn(variables["params"], batch, rng))
    assert loss.shape == () and "timing/steps_per_second" in metrics
    with pytest.raises(TypeError, match="wraps a hypermoe_jax.models model"):
        t5x_models.T5XModel(object(), optimizer())


# --------------------------------------------------------------------------------------------
# Inference signatures, vocabulary check, partitioner
# --------------------------------------------------------------------------------------------


def test_inference_functions_take_flax_mutables(smoe_dropout):
    model, batch, state = smoe_dropout
    # T5X passes flax_mutables (and rng) only to functions whose signature names them.
    for fn in (model.predict_batch, model.predict_batch_with_aux, model.score_batch):
        assert "flax_mutables" in inspect.signature(fn).parameters
    assert "rng" in inspect.signature(model.predict_batch).parameters
    frozen = {"frozen": state.flax_mutables["frozen"]}
    got = jax.jit(model.score_batch)(state.params, batch, flax_mutables=state.flax_mutables)
    want = jax.jit(model.model.score_batch)(state.params, batch, flax_mutables=frozen)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    tokens = jax.jit(model.predict_batch)(
        state.params, batch, jax.random.PRNGKey(0), flax_mutables=state.flax_mutables)
    want_tokens = jax.jit(model.model.predict_batch)(state.params, batch, jax.random.PRNGKey(0),
                                                     flax_mutables=frozen)
    np.testing.assert_array_equal(tokens, want_tokens)


def test_t5x_vocabulary_check():
    byte = seqio.ByteVocabulary()
    cfg = utils.DatasetConfig(mixture_or_task_name="wiki_char_lm",
                              task_feature_lengths={"targets": 8}, split="train", batch_size=2,
                              shuffle=False, seed=0)
    good = t5x_models.T5XModel(tiny_model("switch", vocabulary=byte))
    utils.verify_matching_vocabs(cfg, good)
    wrong = t5x_models.T5XModel(tiny_model("switch", vocabulary=seqio.ByteVocabulary(extra_ids=10)))
    with pytest.raises(ValueError, match="vocabularies do not match"):
        utils.verify_matching_vocabs(cfg, wrong)


def test_expert_partitioner_mesh_layout_and_abstract_mesh():
    assert jax.device_count() == 8
    p = t5x_partitioning.ExpertPartitioner(num_expert_partitions=4)
    assert dict(p.mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert dict(t5x_partitioning.ExpertPartitioner(3, num_partitions=2).mesh.shape) == {
        "data": 2, "expert": 2, "model": 2}
    layout = p.get_data_layout(8)
    assert (layout.batch_size, layout.shard_id, layout.num_shards) == (8, 0, 1)
    with pytest.raises(ValueError, match="divisible by the data-parallel devices"):
        p.get_data_layout(6)
    with pytest.raises(ValueError, match="num_partitions=3 does not divide"):
        _ = t5x_partitioning.ExpertPartitioner(2, num_partitions=3).mesh
    # Partitioned functions run under the abstract mesh the MoE layers read, with the batch
    # split over (data, expert).
    seen = {}

    def fn(x):
        seen["mesh"] = dict(jax.sharding.get_abstract_mesh().shape)
        return x * 2

    f = p.partition(fn, in_axis_resources=(p.data_partition_spec,),
                    out_axis_resources=p.data_partition_spec)
    out = f(jnp.arange(16.0).reshape(8, 2))
    assert seen["mesh"] == {"data": 2, "expert": 4, "model": 1}
    assert out.sharding.spec == jax.sharding.PartitionSpec(("data", "expert"))
    np.testing.assert_array_equal(out, np.arange(16.0).reshape(8, 2) * 2)


# --------------------------------------------------------------------------------------------
# gin/t5x
# --------------------------------------------------------------------------------------------

REPO_GIN = __import__("pathlib").Path(__file__).resolve().parent.parent / "gin"
T5X_MODEL_GINS = sorted(p.name for p in (REPO_GIN / "t5x").glob("*.gin"))


@gin.configurable
def _model_of(model=gin.REQUIRED):
    return model


def test_every_model_gin_has_a_t5x_twin():
    assert T5X_MODEL_GINS == sorted(p.name for p in (REPO_GIN / "models").glob("*.gin"))


@pytest.mark.parametrize("name", T5X_MODEL_GINS)
def test_t5x_model_gin_builds_its_model(name):
    """Each gin/t5x model gin gives a T5XModel around the model of gin/models/<name> with T5X's
    Adafactor; TRAIN_STEPS and BATCH_SIZE have defaults for t5x.eval / t5x.infer."""
    gin.clear_config()
    try:
        gin.add_config_file_search_path(str(REPO_GIN))
        gin.parse_config_files_and_bindings([f"t5x/{name}"], ["_model_of.model = %MODEL"])
        model = _model_of()
    finally:
        gin.clear_config()
    assert isinstance(model, t5x_models.T5XModel)
    assert isinstance(model.optimizer_def, adafactor.Adafactor)
    decoder_only = "_lm_" in name
    assert isinstance(model.model, models.DecoderOnlyModel if decoder_only
                      else models.EncoderDecoderModel)
    moe = model.model.module.config.moe
    assert (moe.hyper_experts is not None) == name.startswith("hypermoe")
    assert (moe.shared_adapter is not None) == name.startswith("moe_share")
    if name.startswith(("hyperrouter", "smoe_dropout")):
        assert model.model.k_schedule is not None and model.model.k_schedule.total_steps is None
