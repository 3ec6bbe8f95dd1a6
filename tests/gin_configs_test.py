"""Every gin file under gin/ parses, finalises and builds a (tiny) model.

Model gins are built at a tiny size (their MODEL_SIZE overridden) with ``jax.eval_shape``, so no
memory is allocated; their full-size configs are checked against ``sizes.SIZES``. Run gins are
combined with a tiny model gin; experiment gins are built as they are, only shrunk.
"""

import re
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from hypermoe_jax import models
from hypermoe_jax.architectures import sizes
from hypermoe_jax.layers import variants as variants_lib
from hypermoe_jax.training import gin_utils

GIN_DIR = Path(__file__).resolve().parent.parent / "gin"
MODEL_GINS = sorted(p.relative_to(GIN_DIR).as_posix() for p in (GIN_DIR / "models").glob("*.gin"))
RUN_GINS = sorted(p.relative_to(GIN_DIR).as_posix() for p in (GIN_DIR / "runs").glob("*.gin"))
EXPERIMENT_GINS = sorted(
    p.relative_to(GIN_DIR).as_posix() for p in (GIN_DIR / "experiments").glob("*.gin"))
ARCHITECTURES = sorted(
    p.relative_to(GIN_DIR).as_posix() for p in (GIN_DIR / "models/architectures").glob("*.gin"))
# Values for the macros a run gin requires.
RUN_MACROS = [
    "MODEL_DIR = '/tmp/hypermoe-gin-test/run'",
    "MIXTURE_OR_TASK_NAME = 'wiki_char_lm'",
    "TASK_FEATURE_LENGTHS = {'targets': 16}",
    "TRAIN_STEPS = 10",
    "BATCH_SIZE = 8",
    "INITIAL_CHECKPOINT_PATH = '/tmp/hypermoe-gin-test/init'",
    "CHECKPOINT_PATH = '/tmp/hypermoe-gin-test/ckpt'",
    "EVAL_OUTPUT_DIR = '/tmp/hypermoe-gin-test/eval'",
    "INFER_OUTPUT_DIR = '/tmp/hypermoe-gin-test/infer'",
]


@gin.configurable
def probe(value=gin.REQUIRED):
    """Returns what gin binds to ``probe.value`` (a macro), evaluated."""
    return value


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _parse(files, bindings=()):
    gin_utils.parse(list(files), [*bindings, "probe.value = %MODEL"])
    return probe()


def _is_decoder_only(model_gin: str) -> bool:
    return "_lm_" in model_gin or "decoder_only" in (GIN_DIR / model_gin).read_text()


def _tiny(decoder_only: bool) -> list[str]:
    size = "lm_tiny" if decoder_only else "tiny"
    return [f"MODEL_SIZE = '{size}'", "NUM_EMBEDDINGS = 128"]


def _build(model) -> dict:
    """Initial variables of ``model`` for a tiny batch, as shapes (nothing allocated)."""
    length = 8
    if isinstance(model, models.DecoderOnlyModel):
        shapes = {k: (2, length) for k in ("decoder_input_tokens", "decoder_target_tokens")}
    else:
        shapes = {k: (2, length) for k in ("encoder_input_tokens", "decoder_input_tokens",
                                           "decoder_target_tokens")}
    variables = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes),
                               jax.random.PRNGKey(0))
    assert "params" in variables
    return variables


def _name_parts(model_gin: str) -> tuple[str, str]:
    """``models/hypermoe_lm_small_16.gin`` -> ('hypermoe', 'lm_small_16')."""
    stem = Path(model_gin).stem
    variant = next(v for v in sorted(variants_lib.VARIANTS, key=len, reverse=True)
                   if stem.startswith(v + "_"))
    return variant, stem[len(variant) + 1:]


def test_there_are_gin_files():
    assert len(MODEL_GINS) >= 25 and len(RUN_GINS) == 4 and len(EXPERIMENT_GINS) >= 5
    assert {"runs/pretrain.gin", "runs/finetune.gin", "runs/eval.gin", "runs/infer.gin"} == set(
        RUN_GINS)
    variants = {_name_parts(g)[0] for g in MODEL_GINS}
    assert variants == set(variants_lib.VARIANTS)


@pytest.mark.parametrize("model_gin", MODEL_GINS)
def test_model_gin_builds_tiny_model(model_gin):
    variant, size_name = _name_parts(model_gin)
    decoder_only = _is_decoder_only(model_gin)
    # A k schedule refers to TRAIN_STEPS, which the run gin sets.
    model = _parse([model_gin], [*_tiny(decoder_only), "TRAIN_STEPS = 10"])
    cfg = model.config
    assert cfg.moe.variant == variant
    expected_experts = int(re.search(r"_(\d+)$", size_name).group(1)) if re.search(
        r"_\d+$", size_name) else 4
    assert cfg.moe.num_experts == expected_experts
    assert isinstance(model, models.DecoderOnlyModel if decoder_only
                      else models.EncoderDecoderModel)
    variables = _build(model)
    params = variables["params"]
    stacks = ["decoder"] if decoder_only else ["encoder", "decoder"]
    assert set(stacks) <= set(params), sorted(params)
    if variant == "hypermoe":
        for stack in stacks:
            assert "hyper_generator" in params[stack], sorted(params[stack])
    if variant in ("hyperrouter", "smoe_dropout"):
        assert "frozen" in variables  # fixed router weights, outside params
        assert model.k_schedule is not None and model.k_schedule.total_steps == 10
    else:
        assert "frozen" not in variables


@pytest.mark.parametrize("model_gin", [g for g in MODEL_GINS if "tiny" not in g])
def test_full_size_model_gin_dims(model_gin):
    """The full-size configs have the published dims (their parameter counts are in
    eval_shape_test.py)."""
    _, size_name = _name_parts(model_gin)
    size = re.sub(r"_\d+$", "", size_name)
    size = "switch_base" if size == "base" else size  # *_base_8: google/switch-base-8's dims
    model = _parse([model_gin], ["TRAIN_STEPS = 10"])
    cfg = model.config
    want = sizes.SIZES[size]
    for field, value in want.items():
        if field == "num_encoder_layers" and _is_decoder_only(model_gin):
            continue
        assert getattr(cfg, field) == value, (field, getattr(cfg, field), value)


@pytest.mark.parametrize("run_gin", RUN_GINS)
def test_run_gin_with_tiny_model(run_gin):
    model = _parse(["models/hypermoe_lm_tiny.gin", run_gin], RUN_MACROS)
    fn = gin.query_parameter("hypermoe_jax.training.cli.run.fn")
    name = Path(run_gin).stem
    want = {"pretrain": "train", "finetune": "train", "eval": "evaluate", "infer": "infer"}[name]
    assert fn.selector.endswith(want), fn.selector
    _build(model)


@pytest.mark.parametrize("experiment_gin", EXPERIMENT_GINS)
def test_experiment_gin_builds(experiment_gin):
    import seqio

    import tasks  # noqa: F401  (registers the tasks the experiments name)

    text = (GIN_DIR / experiment_gin).read_text()
    assert text.startswith("#"), "an experiment documents its command and expected result"
    header = text.split("include", 1)[0]
    assert "python -m hypermoe_jax" in header and "Expected" in header, experiment_gin
    decoder_only = "_lm_" in text or "experiments/hyperrouter" in text
    model = _parse([experiment_gin], [*RUN_MACROS[:1], *RUN_MACROS[5:], *_tiny(decoder_only)])
    task = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
    assert task in seqio.TaskRegistry.names() or task in seqio.MixtureRegistry.names(), task
    _build(model)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_architecture_alone_names_what_is_missing(architecture):
    with pytest.raises(gin_utils.GinConfigError) as e:
        _parse([architecture])
    for macro in ("MODEL_SIZE", "MOE_VARIANT", "NUM_EXPERTS"):
        assert macro in str(e.value)


def test_model_gin_without_run_gin_names_train_steps():
    """t5x#370: a model gin whose k schedule refers to TRAIN_STEPS, used without a run gin."""
    with pytest.raises(gin_utils.GinConfigError, match=r"TRAIN_STEPS: used in .*smoe_dropout"):
        _parse(["models/smoe_dropout_tiny.gin"])


def test_unknown_moe_option_is_explained():
    with pytest.raises(gin_utils.GinConfigError, match="RouterConfig.*capacity"):
        _parse(["models/switch_tiny.gin"], ["routers.RouterConfig.capacity = 2"])


def test_moe_sub_configs_are_bound_directly():
    """Each MoE option is bound once, on the sub-config that declares it, and reaches the layers;
    the variant keeps only its own extras."""
    model = _parse(["models/hypermoe_tiny.gin"], [
        "routers.RouterConfig.batch_prioritized = True",
        "dispatch.DispatchConfig.group_size = 4",
        "experts.ExpertsConfig.dropout_rate = 0.25",
        "hyper_experts.HyperExpertsConfig.bottleneck_dim = 16",
        "NUM_SELECTED = 2",
    ])
    moe = model.config.moe
    assert moe.router.batch_prioritized and moe.router.num_selected == 2
    assert moe.dispatch.group_size == 4 and moe.experts.dropout_rate == 0.25
    assert moe.hyper_experts.bottleneck_dim == 16
    assert moe.experts.hidden_dim == model.config.mlp_dim  # unset: the dense MLP's
    params = _build(model)["params"]
    w_down = params["encoder"]["hyper_generator"]["hypernet"]["w_down_kernel"]
    assert w_down.value.shape[-1] == 16
    gin.clear_config()
    switch = _parse(["models/hypermoe_tiny.gin"], ["MOE_VARIANT = 'switch'"])
    assert switch.config.moe.variant == "switch" and switch.config.moe.hyper_experts is None


def test_quickstart_experiment_trains_on_the_offline_wiki_text():
    model = _parse(["experiments/quickstart_wiki_char.gin"])
    assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "wiki_char_lm"
    assert model.config.moe.variant == "hypermoe"
    assert isinstance(model, models.DecoderOnlyModel)
    counts = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_build(model)["params"]))
    assert 1e6 < counts < 1e7


def test_gin_files_resolve_from_a_directory_with_runs_and_models(tmp_path, monkeypatch):
    """The quickstart leaves ``runs/`` in the working directory (importable there as a namespace
    package); every experiment's includes still resolve to gin/."""
    import sys

    for d in ("runs/quickstart", "models/architectures", "experiments"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs/pretrain.gin").write_text("not gin\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    try:
        for experiment_gin in EXPERIMENT_GINS:
            gin.clear_config()
            files = gin_utils.parse([experiment_gin], [*RUN_MACROS[:1], *RUN_MACROS[5:]],
                                    finalize=False)
            assert all(GIN_DIR in f.parents for f in files), (experiment_gin, files)
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] in ("runs", "models", "experiments"):
                del sys.modules[name]
