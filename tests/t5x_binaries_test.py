"""The upstream T5X binaries -- ``t5x.train``, ``t5x.eval``, ``t5x.infer`` -- running this project's
models from the gin files in ``gin/t5x/`` only, as subprocesses, exactly as the README's commands
(plus a gin file shrinking the model and the fake offline data of ``helpers``).

Covered: every variant trains (Switch, MoE-Share, HyperRouter: decoder-only; SMoE-Dropout:
encoder-decoder -- the two k schedules that must grow under T5X's trainer, one per architecture;
HyperMoE: both, encoder-decoder fine-tuned from a converted Hugging Face Switch checkpoint);
pretrain -> fine-tune -> eval (seqio accuracy) -> infer on one checkpoint;
expert parallelism (8 devices, expert axis 4) equal to one device and compiled with all_to_all.
``HYPERMOE_T5X_FULL_MATRIX=1`` trains every variant in both architectures.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import import_t5x, write_offline_cache

import_t5x()

from hypermoe_jax.layers.routing import linear_k_schedule  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENC_DEC = "encoder_decoder"
DEC_ONLY = "decoder_only"
# model gin -> its task settings (byte-level LM / word-level sentiment with the offline vocab).
LM = {"MIXTURE_OR_TASK_NAME": "'wiki_char_lm'", "TASK_FEATURE_LENGTHS": "{'targets': 32}"}
SENTIMENT = {"MIXTURE_OR_TASK_NAME": "'rotten_tomatoes_sentiment'",
             "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 4}"}
K_SCHEDULED = {"hyperrouter": 2, "smoe_dropout": 2}  # variant -> K_MIN of its model gins
VARIANTS = ("switch", "hypermoe", "hyperrouter", "smoe_dropout", "moe_share")
# (variant, architecture) trained by test_train_variant; the chain and expert-parallel tests
# add smoe_dropout / encoder-decoder and hypermoe / decoder-only.
# (HyperMoE encoder-decoder trains in test_finetune_converted_hf_switch_as_hypermoe.)
CASES = [("switch", DEC_ONLY), ("moe_share", DEC_ONLY), ("hyperrouter", DEC_ONLY)]
if os.environ.get("HYPERMOE_T5X_FULL_MATRIX"):
    CASES = [(v, a) for v in VARIANTS for a in (ENC_DEC, DEC_ONLY)]

_TEST_GIN = """
from __gin__ import dynamic_registration
from hypermoe_jax.architectures import sizes
from hypermoe_jax.data import vocab

sizes.{fn}.emb_dim = 32
sizes.{fn}.mlp_dim = 64
sizes.{fn}.num_heads = 2
sizes.{fn}.head_dim = 16
{layers}
"""
_OFFLINE_VOCAB_GIN = """
VOCABULARY = @vocab.offline_vocabulary()
NUM_EMBEDDINGS = 8192
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5x")
    cache = root / "cache"
    write_offline_cache(cache, wiki_repeat=100)
    (root / "lm.gin").write_text(_TEST_GIN.format(
        fn="decoder_only", layers="sizes.decoder_only.num_decoder_layers = 2"))
    (root / "t5.gin").write_text(_TEST_GIN.format(
        fn="sparse_t5", layers="sizes.sparse_t5.num_encoder_layers = 2\n"
        "sizes.sparse_t5.num_decoder_layers = 2") + _OFFLINE_VOCAB_GIN)
    return root


def model_gin(variant: str, arch: str) -> str:
    return f"t5x/{variant}_lm_tiny.gin" if arch == DEC_ONLY else f"t5x/{variant}_tiny.gin"


def task(arch: str) -> dict:
    return LM if arch == DEC_ONLY else SENTIMENT


def t5x(env: Path, binary: str, gin_files, macros: dict, *, devices: int = 1,
        extra_xla: str = "", cwd: Path | None = None, test_gin: Path | None = None) -> str:
    """Runs ``python -m t5x.<binary>`` with this project's gin directory and ``test_gin`` (default:
    the gin shrinking the model); returns its log."""
    if test_gin is None:
        test_gin = env / ("lm.gin" if any("_lm_" in f for f in gin_files) else "t5.gin")
    argv = [sys.executable, "-m", f"t5x.{binary}", f"--gin_search_paths={REPO / 'gin'}",
            *[f"--gin_file={f}" for f in [*gin_files, str(test_gin)]],
            *[f"--gin.{k}={v}" for k, v in macros.items()]]
    run_env = {**os.environ, "HYPERMOE_CACHE": str(env / "cache"), "JAX_PLATFORMS": "cpu",
               "TF_CPP_MIN_LOG_LEVEL": "3",
               # Runs of one program (pretrain / fine-tune steps) compile it once.
               "JAX_COMPILATION_CACHE_DIR": str(env / "jax_cache"),
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {extra_xla}"}
    proc = subprocess.run(argv, cwd=cwd or env, env=run_env, capture_output=True, text=True,
                          timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"t5x.{binary} failed (rc {proc.returncode}):\n{log[-6000:]}"
    return log


def train_macros(model_dir: Path, arch: str, steps: int, **extra) -> dict:
    return {"MODEL_DIR": f"'{model_dir}'", **task(arch), "TRAIN_STEPS": steps,
            "BATCH_SIZE": 8, "RANDOM_SEED": 0, "SHUFFLE_TRAIN_EXAMPLES": False,
            # One "epoch" per step: T5X writes every step's metrics; no train eval.
            "train.gc_period": 1, "train.train_eval_dataset_cfg": None, **extra}


def scalars(model_dir: Path, collection: str = "train") -> dict[int, dict[str, float]]:
    """step -> {tag: value} of the TensorBoard summaries T5X wrote."""
    import tensorflow as tf

    out: dict[int, dict[str, float]] = {}
    for path in sorted((model_dir / collection).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for v in event.summary.value:
                if v.HasField("tensor") and v.tensor.dtype in (1, 2):  # float / double
                    value = tf.make_ndarray(v.tensor)
                    if value.ndim == 0:
                        out.setdefault(event.step, {})[v.tag] = float(value)
    return out


def checkpoint_state(path: Path) -> dict:
    import orbax.checkpoint as ocp

    return ocp.PyTreeCheckpointer().restore(str(path / "state"))


def check_train_run(model_dir: Path, variant: str, steps: int, first_step: int = 0) -> dict:
    """T5X's summaries of a run: every step's loss finite, T5X's timing metrics there, the MoE
    metrics of the model, and k following the model's schedule under T5X's trainer."""
    s = scalars(model_dir)
    logged = sorted(k for k, v in s.items() if "loss" in v)
    assert logged == list(range(first_step + 1, steps + 1)), logged
    for step in logged:
        m = s[step]
        assert np.isfinite(m["loss"]) and m["loss"] > 0
        assert m["timing/steps_per_second"] > 0 and m["timing/seqs_per_second"] > 0
        assert any(k.startswith("moe/") and k.endswith("/expert_load/0") for k in m)
        if variant in K_SCHEDULED:
            # metrics at step t+1 are those of the update from step t.
            want = float(linear_k_schedule(step - 1, steps, K_SCHEDULED[variant], 4))
            assert m["moe/active_k"] == want, (step, m["moe/active_k"], want)
    if variant in K_SCHEDULED:
        ks = [s[t]["moe/active_k"] for t in logged]
        assert ks[-1] > ks[0] or first_step, ks
    state = checkpoint_state(model_dir / f"checkpoint_{steps}")
    assert int(state["state"]["step"]) == steps
    if variant in K_SCHEDULED:
        # The model's own step (its k schedule's) is saved and equals T5X's.
        assert int(state["flax_mutables"]["k_schedule"]["step"]) == steps
        assert "frozen" in state["flax_mutables"]
    else:
        assert not state.get("flax_mutables")
    return s


@pytest.mark.parametrize("variant,arch", CASES)
def test_train_variant(env, tmp_path, variant, arch):
    model_dir = tmp_path / "model"
    t5x(env, "train", [model_gin(variant, arch), "t5x/runs/pretrain.gin"],
        train_macros(model_dir, arch, 3))
    check_train_run(model_dir, variant, 3)


def test_pretrain_finetune_eval_infer(env, tmp_path):
    """SMoE-Dropout encoder-decoder (frozen router, k schedule) on the sentiment task: T5X
    pretraining, fine-tuning from its checkpoint, seqio evaluation of predictions, inference; the
    accuracy T5X's evaluator reports is that of the predictions t5x.infer writes."""
    gin = model_gin("smoe_dropout", ENC_DEC)
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    t5x(env, "train", [gin, "t5x/runs/pretrain.gin"], train_macros(pre, ENC_DEC, 2))
    check_train_run(pre, "smoe_dropout", 2)
    t5x(env, "train", [gin, "t5x/runs/finetune.gin"], train_macros(
        ft, ENC_DEC, 4, INITIAL_CHECKPOINT_PATH=f"'{pre / 'checkpoint_2'}'",
        MIXTURE_OR_TASK_MODULE=None))
    check_train_run(ft, "smoe_dropout", 4, first_step=2)

    ckpt = ft / "checkpoint_4"
    eval_dir, infer_dir = tmp_path / "eval", tmp_path / "infer"
    t5x(env, "eval", [gin, "t5x/runs/eval.gin"],
        {**SENTIMENT, "CHECKPOINT_PATH": f"'{ckpt}'", "EVAL_OUTPUT_DIR": f"'{eval_dir}'"})
    metrics_files = list(eval_dir.rglob("rotten_tomatoes_sentiment-metrics.jsonl"))
    assert metrics_files, sorted(p.name for p in eval_dir.rglob("*"))
    record = json.loads(metrics_files[0].read_text().splitlines()[-1])
    assert record["step"] == 4
    accuracy = record["accuracy"]

    t5x(env, "infer", [gin, "t5x/runs/infer.gin"],
        {**SENTIMENT, "CHECKPOINT_PATH": f"'{ckpt}'", "INFER_OUTPUT_DIR": f"'{infer_dir}'"})
    outputs = list(infer_dir.glob("rotten_tomatoes_sentiment-*.jsonl*"))
    assert outputs, sorted(p.name for p in infer_dir.rglob("*"))
    rows = [json.loads(line) for p in outputs for line in p.read_text().splitlines()]
    assert len(rows) == 6  # the fake test split
    labels = ["positive" if "charming" in r["inputs"]["inputs_pretokenized"] else "negative"
              for r in rows]
    correct = [r["prediction"] == label for r, label in zip(rows, labels)]
    np.testing.assert_allclose(accuracy, 100.0 * np.mean(correct), atol=1e-6)


def test_expert_parallel_equals_one_device(env, tmp_path):
    """HyperMoE LM under T5X on 8 devices with an expert axis of 4 (ExpertPartitioner): the
    same losses as on one device, and the train step compiled with all_to_all (shard_map)."""
    gin = [model_gin("hypermoe", DEC_ONLY), "t5x/runs/pretrain.gin"]
    runs = {}
    for devices in (1, 8):
        model_dir, dump = tmp_path / f"d{devices}", tmp_path / f"hlo{devices}"
        log = t5x(env, "train", gin, train_macros(model_dir, DEC_ONLY, 3, DROPOUT_RATE=0.0),
                  devices=devices,
                  extra_xla=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=.*train_step.*")
        hlo = "".join(p.read_text() for p in dump.glob("*train_step*after_optimizations.txt"))
        assert hlo, sorted(p.name for p in dump.glob("*"))
        runs[devices] = (check_train_run(model_dir, "hypermoe", 3), hlo, log)
    assert "cannot hold an expert axis" not in runs[8][2]
    assert "all-to-all" in runs[8][1] and "all-to-all" not in runs[1][1]
    for step in (1, 2, 3):
        np.testing.assert_allclose(runs[8][0][step]["loss"], runs[1][0][step]["loss"],
                                   rtol=1e-5)
        np.testing.assert_allclose(runs[8][0][step]["moe/load_balance_loss"],
                                   runs[1][0][step]["moe/load_balance_loss"], rtol=1e-5)


def test_finetune_converted_hf_switch_as_hypermoe(env, tmp_path):
    """A Hugging Face Switch folder (the no-drop golden, its vocabulary padded to the offline
    one's 8192 rows) converted with ``--variant hypermoe --t5x_checkpoint`` and fine-tuned by
    ``t5x.train`` from the gins and T5X checkpoint the converter wrote: the run starts from the
    Hugging Face weights (the generator from its initialisation) and trains."""
    from hypermoe_jax.convert import cli, hf_io

    golden = REPO / "tests" / "goldens" / "hf_switch" / "no_drop"
    config, tensors = hf_io.read_config(golden), hf_io.read_state_dict(golden)
    shared = np.zeros((8192, tensors["shared.weight"].shape[1]), np.float32)
    shared[: len(tensors["shared.weight"])] = tensors["shared.weight"]
    hf_folder = hf_io.write_hf_folder(tmp_path / "hf", {**config, "vocab_size": 8192},
                                      {**tensors, "shared.weight": shared})
    dest = tmp_path / "converted"
    assert cli.main(["hf-switch", str(hf_folder), str(dest), "--variant", "hypermoe",
                     "--t5x_checkpoint"]) == 0
    start = checkpoint_state(dest / "t5x" / "checkpoint_0")
    np.testing.assert_array_equal(start["target"]["token_embedder"]["embedding"], shared)
    assert "hyper_generator" in start["target"]["encoder"]

    vocab_gin = tmp_path / "vocab.gin"
    vocab_gin.write_text("from __gin__ import dynamic_registration\n"
                         "from hypermoe_jax.data import vocab\n" + _OFFLINE_VOCAB_GIN)
    ft = tmp_path / "ft"
    t5x(env, "train", [str(dest / "t5x_model.gin"), "t5x/runs/finetune.gin"], train_macros(
        ft, ENC_DEC, 2, INITIAL_CHECKPOINT_PATH=f"'{dest / 't5x' / 'checkpoint_0'}'",
        MIXTURE_OR_TASK_MODULE=None), test_gin=vocab_gin)
    check_train_run(ft, "hypermoe", 2)
    end = checkpoint_state(ft / "checkpoint_2")["target"]
    moved = np.abs(end["token_embedder"]["embedding"] - shared).max()
    assert 0 < moved < 1.0  # fine-tuned from the converted weights, not from scratch
