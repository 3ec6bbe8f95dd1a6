"""Hugging Face Switch Transformers / T5 <-> ours, against goldens written by real transformers.

The goldens (``tests/goldens/make_hf_switch_goldens.py``: transformers 5.24.0, torch 2.13.0, CPU,
random small models) hold what a Hugging Face folder holds plus the fp32 logits, the routing of
every sparse layer, the losses and greedy tokens. Nothing here needs torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import linen as nn

from hypermoe_jax import decoding
from hypermoe_jax.convert import cli, hf_io, hf_switch, trees
from hypermoe_jax.training import checkpoints

GOLDENS = Path(__file__).parent / "goldens"
SWITCH_CASES = ("no_drop", "capacity_drop", "padded", "uneven_steps")


def _load(folder: Path):
    return hf_io.read_config(folder), hf_io.read_state_dict(folder), \
        dict(np.load(folder / "goldens.npz"))


def _batch(g):
    ids = g["input_ids"].astype(np.int32)
    labels = g["labels"]
    targets = np.where(labels < 0, 0, labels).astype(np.int32)
    dec_in = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": ids, "decoder_input_tokens": dec_in,
            "decoder_target_tokens": targets,
            "decoder_loss_weights": (labels >= 0).astype(np.float32)}


def _forward(model, params, batch):
    """``model.forward`` (eval: no dropout) under jit: ``(loss, metrics, logits)``."""
    return jax.jit(lambda p, b: model.forward(p, b, None))(params, batch)


def _init(model, batch, seed=0):
    shapes = {k: v.shape for k, v in batch.items()}
    return nn.unbox(jax.jit(lambda r: model.get_initial_variables(r, shapes))(
        jax.random.PRNGKey(seed)))


def _convert(folder: Path, **kwargs):
    hf, state, g = _load(folder)
    settings = hf_switch.config_from_hf(hf, **kwargs)
    model = cli.build_model(settings, decode_fn=decoding.temperature_sample)
    converted = hf_switch.params_from_hf(
        state, settings.transformer, cli.abstract_variables(model)["params"],
        model_type=settings.model_type, num_experts=settings.num_experts,
        lm_head_from_embedding=settings.lm_head_from_embedding)
    return settings, model, converted, state, g


@pytest.fixture(scope="module", params=SWITCH_CASES)
def switch_case(request):
    return (request.param, *_convert(GOLDENS / "hf_switch" / request.param))


def test_switch_logits_losses_and_routing_match_transformers(switch_case):
    name, settings, model, converted, _, g = switch_case
    assert converted.missing == [] and converted.unused == []
    batch = _batch(g)
    loss, metrics, logits = _forward(model, converted.params, batch)
    np.testing.assert_allclose(np.asarray(logits), g["logits"], atol=1e-4, rtol=0)
    # HF's loss: mean cross entropy + 0.001 * (z + aux losses of both stacks, each pooled over
    # its sparse layers; none for a stack with sparse step 1).
    np.testing.assert_allclose(float(metrics["cross_ent_loss"]), g["cross_entropy"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["moe/load_balance_loss"]),
                               g["encoder_aux_loss"] + g["decoder_aux_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["moe/router_z_loss"]),
                               g["encoder_z_loss"] + g["decoder_z_loss"], rtol=1e-5)
    np.testing.assert_allclose(float(loss), g["loss"], rtol=1e-5)

    _, aux = jax.jit(lambda p, b: model.module.apply(
        {"params": p}, b["encoder_input_tokens"], b["decoder_input_tokens"],
        b["decoder_target_tokens"], enable_dropout=False))(converted.params, batch)
    layers = hf_switch.hf_router_layers(settings.transformer)
    assert sorted(layers) == sorted(str(x) for x in g["router_layers"])
    dropped = 0
    for layer, (stack, j) in layers.items():
        expert = np.asarray(aux[stack].expert_index[j][..., 0])
        kept = np.asarray(aux[stack].kept[j][..., 0])
        np.testing.assert_array_equal(kept, g[f"routing/{layer}/kept"], err_msg=layer)
        # HF reports the expert of kept tokens only (a dropped token's one-hot row is all 0).
        np.testing.assert_array_equal(expert[kept], g[f"routing/{layer}/expert"][kept])
        np.testing.assert_array_equal(expert, g[f"routing/{layer}/logits"].argmax(-1))
        dropped += int((~kept).sum())
    assert (dropped > 0) == (name == "capacity_drop")


def test_switch_greedy_decoding_matches_transformers(switch_case):
    _, _, model, converted, _, g = switch_case
    ids = g["input_ids"].astype(np.int32)
    new = g["generated"].shape[1] - 1  # HF's output starts with the decoder start token
    tokens = model.predict_batch(
        converted.params,
        {"encoder_input_tokens": ids, "decoder_input_tokens": np.zeros((len(ids), new),
                                                                       np.int32)},
        decoder_params={"temperature": 0.0})
    np.testing.assert_array_equal(np.asarray(tokens), g["generated"][:, 1:])


@pytest.mark.parametrize("name", SWITCH_CASES)
def test_weights_round_trip_bit_exact(name):
    hf, state, _ = _load(GOLDENS / "hf_switch" / name)
    settings = hf_switch.config_from_hf(hf)
    model = cli.build_model(settings)
    converted = hf_switch.params_from_hf(state, settings.transformer,
                                         cli.abstract_variables(model)["params"])
    back = hf_switch.params_to_hf(converted.params, settings.transformer)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
        assert back[key].dtype == value.dtype
    assert set(back) - set(state) <= {"lm_head.weight", "encoder.embed_tokens.weight",
                                      "decoder.embed_tokens.weight"}
    again = hf_switch.config_from_hf(hf_switch.config_to_hf(
        settings.transformer, expert_capacity=settings.expert_capacity))
    assert again.transformer == settings.transformer


def test_unrolled_layers_give_the_same_model():
    folder = GOLDENS / "hf_switch" / "uneven_steps"
    _, scanned_model, scanned, _, g = _convert(folder)
    _, unrolled_model, unrolled, _, _ = _convert(folder, scan_layers=False)
    assert "tail" in scanned.params["encoder"] and "layers_0" in unrolled.params["encoder"]
    a = _forward(scanned_model, scanned.params, _batch(g))[2]
    b = _forward(unrolled_model, unrolled.params, _batch(g))[2]
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b), g["logits"], atol=1e-4)


@pytest.mark.parametrize("name", ["t5_v1_1", "t5"])
def test_dense_t5_matches_transformers(name):
    settings, model, converted, _, g = _convert(GOLDENS / "hf_t5" / name)
    assert settings.transformer.moe is None and converted.missing == []
    # transformers >= 5 writes T5 v1.1 as tied without logit scaling: an untied output layer here.
    assert settings.transformer.logits_via_embedding == (name == "t5")
    loss, _, logits = _forward(model, converted.params, _batch(g))
    np.testing.assert_allclose(np.asarray(logits), g["logits"], atol=1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(loss), g["loss"], rtol=1e-5)


def test_variants_start_from_switch_weights():
    folder = GOLDENS / "hf_switch" / "no_drop"
    _, hyper, hyper_params, state, g = _convert(folder, variant="hypermoe")
    assert hyper_params.unused == []
    assert hyper_params.missing and all("hyper_generator" in m for m in hyper_params.missing)
    _, router, router_params, _, _ = _convert(folder, variant="hyperrouter")
    assert sorted(router_params.unused) == sorted(k for k in state if "router.classifier" in k)
    assert all("router" in m for m in router_params.missing)
    # Fine-tuning starts: the missing variables from their initialisation, the rest from HF.
    for model, converted in ((hyper, hyper_params), (router, router_params)):
        init = _init(model, _batch(g), seed=1)
        params = trees.unflatten({**trees.flatten(init["params"]),
                                       **trees.flatten(converted.params)})
        mutables = {k: v for k, v in init.items() if k != "params"}

        def loss_fn(p, m=model, mutables=mutables):
            return m.loss_fn(p, _batch(g), jax.random.PRNGKey(2), flax_mutables=mutables,
                             step=0)[0]

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        assert np.isfinite(float(loss))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))


def test_scale_input_dropped_tokens_are_reachable():
    folder = GOLDENS / "hf_switch" / "capacity_drop"
    settings, model, converted, _, g = _convert(folder, dropped_token_behavior="scale_input")
    assert settings.transformer.moe.dispatch.dropped_token_behavior == "scale_input"
    logits = np.asarray(_forward(model, converted.params, _batch(g))[2])
    # transformers 5 gives a dropped token 0, so only scale_input's dropped tokens change it.
    assert np.abs(logits - g["logits"]).max() > 1e-2


def test_cli_convert_finetune_gin_and_back_to_hf(tmp_path):
    folder = GOLDENS / "hf_switch" / "capacity_drop"
    dest = tmp_path / "converted"
    assert cli.main(["hf-switch", str(folder), str(dest)]) == 0
    record = json.loads((dest / "conversion.json").read_text())
    assert record["missing"] == [] and record["unused"] == []
    assert "INITIAL_CHECKPOINT_ALLOW_MISSING = False" in (dest / "finetune.gin").read_text()
    # The written model gin and checkpoint are the Hugging Face model.
    model = cli.model_from_gin([str(dest / "model.gin")])
    abstract = cli.abstract_variables(model)
    params, _, missing = checkpoints.restore_params(dest / "checkpoint", abstract["params"])
    assert missing == []
    g = dict(np.load(folder / "goldens.npz"))
    logits = _forward(model, params, _batch(g))[2]
    np.testing.assert_allclose(np.asarray(logits), g["logits"], atol=1e-4)
    # ... and goes back to an identical Hugging Face folder.
    hf_dest = tmp_path / "hf"
    assert cli.main(["to-hf", "--gin_file", str(dest / "model.gin"), str(dest / "checkpoint"),
                     str(hf_dest)]) == 0
    original, written = hf_io.read_state_dict(folder), hf_io.read_state_dict(hf_dest)
    for key, value in original.items():
        np.testing.assert_array_equal(written[key], value, err_msg=key)
    config = hf_io.read_config(hf_dest)
    for key in ("d_model", "d_ff", "num_experts", "expert_capacity", "encoder_sparse_step",
                "decoder_sparse_step", "router_z_loss_coef", "tie_word_embeddings"):
        assert config[key] == hf_io.read_config(folder)[key], key
    # A non-empty destination is refused and kept as it was.
    before = sorted(p.name for p in dest.iterdir())
    assert cli.main(["hf-switch", str(folder), str(dest)]) == 2
    assert sorted(p.name for p in dest.iterdir()) == before


def test_hypermoe_cli_gin_allows_missing_and_restores(tmp_path):
    folder = GOLDENS / "hf_switch" / "no_drop"
    dest = tmp_path / "hypermoe"
    assert cli.main(["hf-switch", str(folder), str(dest), "--variant", "hypermoe"]) == 0
    assert "INITIAL_CHECKPOINT_ALLOW_MISSING = True" in (dest / "finetune.gin").read_text()
    model = cli.model_from_gin([str(dest / "model.gin")])
    assert model.config.moe.variant == "hypermoe"
    init = _init(model, {k: np.zeros(v, np.int32) for k, v in cli._INPUT_SHAPES.items()})
    params, _, missing = checkpoints.restore_params(
        dest / "checkpoint", cli.abstract_variables(model)["params"],
        fallback_params=init["params"])
    assert missing and all("hyper_generator" in m for m in missing)
    state = hf_io.read_state_dict(folder)
    np.testing.assert_array_equal(np.asarray(params["token_embedder"]["embedding"]),
                                  state["shared.weight"])


def test_conversion_errors_say_what_is_wrong(tmp_path):
    folder = GOLDENS / "hf_switch" / "no_drop"
    hf, state, _ = _load(folder)
    with pytest.raises(hf_switch.ConversionError, match="model_type"):
        hf_switch.config_from_hf({**hf, "model_type": "bert"})
    # A config that does not match the weights: the differing parameter is named.
    settings = hf_switch.config_from_hf({**hf, "num_experts": 3})
    model = cli.build_model(settings)
    with pytest.raises(hf_switch.ConversionError, match="router/kernel.*does not match"):
        hf_switch.params_from_hf(state, settings.transformer,
                                 cli.abstract_variables(model)["params"], num_experts=3)
    with pytest.raises(hf_switch.ConversionError, match="lacks"):
        trimmed = {k: v for k, v in state.items() if "block.3" not in k}
        hf_switch.params_from_hf(trimmed, hf_switch.config_from_hf(hf).transformer,
                                 cli.abstract_variables(cli.build_model(
                                     hf_switch.config_from_hf(hf)))["params"])
    assert cli.main(["hf-t5", str(folder), str(tmp_path / "x")]) == 2
    hyper = hf_switch.config_from_hf(hf, variant="hypermoe").transformer
    with pytest.raises(hf_switch.ConversionError, match="only Switch models"):
        hf_switch.config_to_hf(hyper)
    no_capacity = dataclasses.replace(hf_switch.config_from_hf(hf).transformer.moe.dispatch,
                                      expert_capacity=None)
    cfg = hf_switch.config_from_hf(hf).transformer
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, dispatch=no_capacity))
    with pytest.raises(hf_switch.ConversionError, match="expert_capacity"):
        hf_switch.config_to_hf(cfg)


def test_upcycle_cli_from_hf_t5_equals_the_dense_model(tmp_path):
    """HF T5 -> our dense model -> a Switch model upcycled from it: with renormalised top-1 gates
    and no token dropped, the upcycled model's logits are the dense model's at step 0."""
    folder = GOLDENS / "hf_t5" / "t5"
    dense_dest, moe_dest = tmp_path / "t5", tmp_path / "switch"
    assert cli.main(["hf-t5", str(folder), str(dense_dest)]) == 0
    moe_gin = tmp_path / "switch_on_t5.gin"
    moe_gin.write_text("\n".join([
        f"include '{dense_dest / 'model.gin'}'",
        "from __gin__ import dynamic_registration",
        "from hypermoe_jax.architectures import sizes",
        "from hypermoe_jax.layers import routers",
        "from hypermoe_jax.layers import dispatch",
        "sizes.sparse_t5.encoder_sparse_step = 2",
        "sizes.sparse_t5.decoder_sparse_step = 1",
        "routers.RouterConfig.gate_normalization = 'softmax_topk'",
        "dispatch.DispatchConfig.impl = 'dropless'"]) + "\n")
    assert cli.main(["upcycle", str(dense_dest / "checkpoint"), str(moe_dest),
                     "--dense_gin_file", str(dense_dest / "model.gin"),
                     "--gin_file", str(moe_gin), "--gin", "NUM_EXPERTS=4"]) == 0
    record = json.loads((moe_dest / "conversion.json").read_text())
    assert record["kept_initialisation"] and all(
        "router" in k for k in record["kept_initialisation"])
    g = dict(np.load(folder / "goldens.npz"))
    moe = cli.model_from_gin([str(moe_dest / "model.gin")])
    assert moe.config.moe.num_experts == 4 and moe.config.encoder_sparse_step == 2
    params, _, _ = checkpoints.restore_params(moe_dest / "checkpoint",
                                              cli.abstract_variables(moe)["params"])
    moe_logits = _forward(moe, params, _batch(g))[2]
    np.testing.assert_allclose(np.asarray(moe_logits), g["logits"], atol=1e-4)


def test_glue_experiment_takes_the_converted_switch_base_8():
    """experiments/hypermoe_glue.gin (and the Switch / SuperGLUE gins that include it) builds the
    model a converted google/switch-base-8 checkpoint fits: every converted parameter has the
    experiment model's path and shape, and the HF semantics are on."""
    import gin
    from eval_shape_test import SWITCH_BASE_8_HF_CONFIG

    gin.clear_config()
    model = cli.model_from_gin(["experiments/hypermoe_glue.gin"],
                               ["MODEL_DIR='/tmp/unused'", "INITIAL_CHECKPOINT_PATH='/tmp/x'"])
    cfg = model.config
    assert (cfg.sparse_placement, cfg.padding_semantics) == ("hf", "hf")
    assert cfg.moe.dispatch.expert_capacity == 64
    assert cfg.moe.dispatch.dropped_token_behavior == "scale_input"
    assert model.router_loss_pooling == "hf" and model.aux_loss_factor == 0.001
    settings = hf_switch.config_from_hf(SWITCH_BASE_8_HF_CONFIG, variant="hypermoe")
    converted = cli.abstract_variables(cli.build_model(settings))["params"]
    experiment = cli.abstract_variables(model)["params"]
    flat_c, flat_e = trees.flatten(converted), trees.flatten(experiment)
    assert flat_c.keys() == flat_e.keys()
    assert all(flat_c[k].shape == flat_e[k].shape for k in flat_c)
