"""Gin command-line handling (``hypermoe_jax/training/gin_utils.py``) and the trainer's entry
point as a user meets them: which gin files are found from which directory, bindings that would
have no effect, and what a start prints on stderr.
"""

import os
import subprocess
import sys
from pathlib import Path

import gin
import jax
import pytest

from hypermoe_jax.training import cli, gin_utils

REPO = Path(__file__).resolve().parent.parent
GIN_DIR = REPO / "gin"
PRETRAIN_MACROS = [
    "MODEL_DIR = '/tmp/hypermoe-gin-utils-test/run'",
    "MIXTURE_OR_TASK_NAME = 'wiki_char_lm'",
    "TASK_FEATURE_LENGTHS = {'targets': 16}",
    "TRAIN_STEPS = 10",
    "BATCH_SIZE = 8",
]
LM_PRETRAIN = ["models/hypermoe_lm_tiny.gin", "runs/pretrain.gin"]


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory such as the quickstart leaves behind (``runs/quickstart/``), with
    ``models/architectures/`` and ``experiments/`` directories too, first on ``sys.path`` as the
    working directory of ``python -m ...`` is."""
    for d in ("runs/quickstart/checkpoints", "models/architectures", "experiments"):
        (tmp_path / d).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:  # namespace packages imported from tmp_path
        if name.split(".")[0] in ("runs", "models", "experiments"):
            del sys.modules[name]


def _parse(files, bindings=()):
    return gin_utils.parse(list(files), list(bindings), finalize=False)


def _macro(name):
    return gin.query_parameter(f"%{name}")


# ---------------------------------------------------------------------------------------------
# Finding gin files
# ---------------------------------------------------------------------------------------------


def test_includes_resolve_when_the_working_directory_holds_runs_and_models(user_dir):
    import importlib.util

    # What crashed gin's resource reader: these directories import as namespace packages.
    assert importlib.util.find_spec("runs").origin is None
    files = _parse(["experiments/quickstart_wiki_char.gin"])
    assert files[0] == GIN_DIR / "experiments/quickstart_wiki_char.gin"
    assert GIN_DIR / "runs/pretrain.gin" in files
    assert GIN_DIR / "models/architectures/decoder_only.gin" in files
    assert _macro("TRAIN_STEPS") == 300


def test_model_and_run_gin_from_a_directory_with_runs_and_models(user_dir):
    files = _parse(LM_PRETRAIN, PRETRAIN_MACROS)
    assert files[:2] == [GIN_DIR / "models/hypermoe_lm_tiny.gin",
                         GIN_DIR / "models/architectures/decoder_only.gin"]


def test_project_gin_files_win_over_files_in_the_working_directory(user_dir):
    (user_dir / "runs/pretrain.gin").write_text("this is not gin\n")
    (user_dir / "models/architectures/decoder_only.gin").write_text("NOT_GIN = \n")
    files = _parse(["experiments/quickstart_wiki_char.gin"])
    assert GIN_DIR / "runs/pretrain.gin" in files
    assert all(user_dir not in f.parents for f in files), files
    gin.clear_config()
    files = _parse(LM_PRETRAIN, PRETRAIN_MACROS)
    assert files[-1] == GIN_DIR / "runs/pretrain.gin"


def test_user_gin_files_in_the_working_directory_are_found(user_dir):
    exp = user_dir / "my_experiments"
    exp.mkdir()
    (exp / "dims.gin").write_text("from __gin__ import dynamic_registration\n"
                                  "MY_WIDTH = 48\n")
    (exp / "run.gin").write_text(
        "include 'models/hypermoe_lm_tiny.gin'\n"
        "include 'runs/pretrain.gin'\n"
        "include 'my_experiments/dims.gin'\n"
        "from __gin__ import dynamic_registration\n"
        "from hypermoe_jax.architectures import sizes\n"
        "sizes.decoder_only.emb_dim = %MY_WIDTH\n"
        "TRAIN_STEPS = 7\n")
    files = _parse(["my_experiments/run.gin"], PRETRAIN_MACROS[:3] + PRETRAIN_MACROS[4:])
    assert files[0] == exp / "run.gin" and exp / "dims.gin" in files
    assert _macro("TRAIN_STEPS") == 7 and _macro("MY_WIDTH") == 48
    gin.clear_config()
    files = _parse([str(exp / "run.gin")], PRETRAIN_MACROS)  # an absolute path
    assert files[0] == exp / "run.gin"


def test_missing_gin_file_names_the_searched_directories(user_dir):
    with pytest.raises(gin_utils.GinConfigError, match="runs/pretrian.gin.*not found") as e:
        _parse(["models/hypermoe_lm_tiny.gin", "runs/pretrian.gin"])
    assert str(GIN_DIR) in str(e.value) and str(user_dir) in str(e.value)
    assert os.path.dirname(gin.__file__) not in str(e.value)


def test_search_paths_hold_the_project_gin_files_not_gin_configs_package():
    paths = gin_utils.search_paths(["/somewhere/else"])
    assert paths[0] == "/somewhere/else" and paths[-1] == os.getcwd()
    assert str(GIN_DIR) in paths  # a source checkout: the repository's gin/ directory
    assert os.path.dirname(gin.__file__) not in paths
    assert gin_utils.project_gin_dir() == GIN_DIR


# ---------------------------------------------------------------------------------------------
# Bindings that would have no effect
# ---------------------------------------------------------------------------------------------


def test_misspelled_macro_is_an_error_with_a_suggestion():
    with pytest.raises(gin_utils.GinConfigError) as e:
        _parse(LM_PRETRAIN, [*PRETRAIN_MACROS, "NUM_EXPERTSS = 8"])
    msg = str(e.value)
    assert "NUM_EXPERTSS = 8" in msg and "Did you mean: NUM_EXPERTS" in msg, msg


def test_misspelled_required_macro_is_named_with_a_suggestion():
    bindings = [b for b in PRETRAIN_MACROS if not b.startswith("TRAIN_STEPS")]
    with pytest.raises(gin_utils.GinConfigError) as e:
        _parse(LM_PRETRAIN, [*bindings, "TRAIN_STEPSS = 5"])
    msg = str(e.value)
    assert "TRAIN_STEPSS = 5" in msg and "Did you mean: TRAIN_STEPS" in msg, msg


def test_misspelled_macro_in_a_gin_file_names_the_file(tmp_path):
    exp = tmp_path / "exp.gin"
    exp.write_text("include 'models/hypermoe_lm_tiny.gin'\ninclude 'runs/pretrain.gin'\n"
                   "NUM_EXPERTS = 8\nNUM_SELECTD = 2\n")
    with pytest.raises(gin_utils.GinConfigError) as e:
        _parse([str(exp)], PRETRAIN_MACROS)
    msg = str(e.value)
    assert "NUM_SELECTD" in msg and str(exp) in msg and "Did you mean: NUM_SELECTED" in msg, msg
    assert "NUM_EXPERTS =" not in msg


def test_macros_that_are_used_are_accepted(tmp_path):
    """Macros a file defines for another file, parameter bindings with the module path, and the
    run macros of a run gin other than the one parsed (scripts pass them to several runs)."""
    (tmp_path / "width.gin").write_text("WIDTH = 32\n")
    (tmp_path / "use.gin").write_text(
        "from __gin__ import dynamic_registration\n"
        "from hypermoe_jax.architectures import sizes\n"
        "sizes.decoder_only.mlp_dim = %WIDTH\n")
    _parse([*LM_PRETRAIN, str(tmp_path / "width.gin"), str(tmp_path / "use.gin")],
           [*PRETRAIN_MACROS, "sizes.decoder_only.emb_dim = 32", "NUM_EXPERTS = 8",
            "INITIAL_CHECKPOINT_PATH = '/x'", "CHECKPOINT_PATH = '/y'", "ACTIVE_K_VALUES = (1,)"])
    assert _macro("NUM_EXPERTS") == 8
    assert gin.query_parameter("sizes.decoder_only.emb_dim") == 32
    gin.clear_config()
    _parse(["models/hypermoe_lm_tiny.gin", "runs/eval.gin"],
           [*PRETRAIN_MACROS, "CHECKPOINT_PATH = '/y'", "EVAL_OUTPUT_DIR = '/z'",
            "LOG_EVERY = 1"])
    gin.clear_config()
    _parse(["models/switch_tiny.gin"], ["TRAIN_STEPS = 10"])  # a model gin alone


@pytest.mark.parametrize("binding,wrong,right", [
    ("train.stop_after_stepss = 0", "stop_after_stepss", "stop_after_steps"),
    ("hypermoe_jax.training.train.train.stop_after_stepss = 0", "stop_after_stepss",
     "stop_after_steps"),
    ("HyperExpertsConfig.placment = 'fused'", "placment", "placement"),
    ("sizes.decoder_onlyy.emb_dim = 32", "sizes.decoder_onlyy", "sizes.decoder_only"),
    # sizes.decoder_only takes **overrides (TransformerConfig fields): gin accepts any name.
    ("sizes.decoder_only.emb_dimm = 32", "emb_dimm", "emb_dim"),
    ("sizes.decoder_only.num_layer = 2", "num_layer", "num_layers"),
])
def test_misspelled_parameter_is_an_error_with_a_suggestion(binding, wrong, right):
    with pytest.raises(gin_utils.GinConfigError) as e:
        _parse(LM_PRETRAIN, [*PRETRAIN_MACROS, binding])
    msg = str(e.value)
    assert wrong in msg and f"Did you mean: {right}" in msg, msg


def test_cli_reports_a_misspelled_macro(capsys):
    argv = [*(f"--gin_file={f}" for f in LM_PRETRAIN), "--gin.MODEL_DIR=/tmp/x",
            "--gin.MIXTURE_OR_TASK_NAME=wiki_char_lm", "--gin.TASK_FEATURE_LENGTHS={'targets': 8}",
            "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=2", "--gin.NUM_EXPERTSS=8"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "NUM_EXPERTSS" in err and "NUM_EXPERTS?" in err, err


# ---------------------------------------------------------------------------------------------
# What a start prints
# ---------------------------------------------------------------------------------------------


def test_cpu_start_prints_no_cuda_noise(tmp_path):
    """A run that fails on a missing macro, after the gin files imported TensorFlow (seqio)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-m", "hypermoe_jax.train", *(f"--gin_file={f}" for f in LM_PRETRAIN)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Required gin macros are not set" in proc.stderr
    noisy = [line for line in proc.stderr.splitlines()
             if "cuda" in line.lower() or "cuinit" in line.lower()]
    assert not noisy, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr


def test_tensorflow_log_filter():
    text = "\n".join([
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796196551.754316    1739 port.cc:153] oneDNN custom operations are on.",
        "I0000 00:00:1796196551.755623    1739 cudart_stub.cc:31] Could not find cuda drivers",
        "2025-09-17 14:44:05.157831: W external/local_xla/xla/tsl/cuda/cudart_stub.cc:32] x",
        "I0000 00:00:1796196551.754316    1739 cpu_feature_guard.cc:227] This TensorFlow binary",
        "To enable the following instructions: AVX2, rebuild TensorFlow.",
        "/site/x/y.py:3: DeprecationWarning: z is deprecated",  # Python's, kept
        "  import z",
        "E0000 00:00:1796196558.277778    1739 cuda_platform.cc:52] failed call to cuInit: (303)",
        "E0000 00:00:1796196558.277778    1739 other.cc:1] a real error",
        "  its second line",
        "",
    ])
    assert cli._filter_tf_log(text, min_level=2, drop_cuinit=True) == (
        "/site/x/y.py:3: DeprecationWarning: z is deprecated\n  import z\n"
        "E0000 00:00:1796196558.277778    1739 other.cc:1] a real error\n  its second line\n")
    assert "failed call to cuInit" in cli._filter_tf_log(text, min_level=2, drop_cuinit=False)
    assert cli._filter_tf_log(text, min_level=0, drop_cuinit=False) == text
    assert cli._filter_tf_log(text, min_level=3, drop_cuinit=False) == (
        "/site/x/y.py:3: DeprecationWarning: z is deprecated\n  import z\n")


def test_quieting_tensorflow_keeps_jax_devices():
    before = jax.devices()
    cli.quiet_tensorflow()
    import tensorflow as tf

    assert jax.devices() == before
    assert tf.config.get_visible_devices("GPU") == []
