"""End-to-end runs of the trainer (``hypermoe_jax/training/``) driven as a user drives it:
``cli.main([...])`` / ``python -m hypermoe_jax.train`` with ``--gin_file`` and
``--gin.NAME=VALUE``.

Tiny decoder-only LMs (d 32, 2 layers, one MoE layer) train on the fake offline cache
(``wiki_char_lm``); GLUE runs on ``tfds.testing.mock_data`` with a small sentencepiece stand-in
for T5's vocabulary. Compiled programs go to a persistent JAX compilation cache shared by this
module's runs (and the pytest-xdist workers), so each program compiles once per session.
"""

import contextlib
import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import PROSE, write_offline_cache
from jax.experimental.compilation_cache import compilation_cache

from hypermoe_jax.data import cache as cache_lib
from hypermoe_jax.data import vocab as vocab_lib
from hypermoe_jax.training import checkpoints as ckpt_lib
from hypermoe_jax.training import cli, errors, evaluate, gin_utils, progress, train
from hypermoe_jax.training import state as state_lib
from hypermoe_jax.training.datasets import DatasetConfig

REPO = Path(__file__).resolve().parent.parent
STEPS = 8  # the shared pretraining run
LM_MACROS = {
    "MIXTURE_OR_TASK_NAME": "wiki_char_lm",
    "TASK_FEATURE_LENGTHS": "{'targets': 32}",
    "BATCH_SIZE": "8",
    "LOG_EVERY": "1",
    "EVAL_PERIOD": "4",
    "EVAL_STEPS": "2",
    "CHECKPOINT_PERIOD": "4",
}
LR = "0.01"  # pretraining's rsqrt schedule is 0.01 before its 10k warmup steps
# A checkpoint of the initialisation (saved at step 0; no train step is compiled).
STOP_AT_0 = ["--gin.hypermoe_jax.training.train.train.stop_after_steps=0"]
NO_EVAL = ["--gin.hypermoe_jax.training.train.train.train_eval_dataset_cfg=None"]

_SIZES_GIN = """
from __gin__ import dynamic_registration
from hypermoe_jax.architectures import sizes

sizes.{fn}.emb_dim = 32
sizes.{fn}.mlp_dim = 64
sizes.{fn}.num_heads = 2
sizes.{fn}.head_dim = 16
"""
# Pretraining with a constant learning rate: the same train step as runs/finetune.gin with
# LEARNING_RATE = %LR, so the two compile to one program.
_CONSTANT_LR_GIN = f"""
from __gin__ import dynamic_registration
from hypermoe_jax.training import optimizers

LEARNING_RATE = {LR}
optimizers.make_optimizer.learning_rate = @optimizers.constant_schedule()
optimizers.constant_schedule.learning_rate = %LEARNING_RATE
"""


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _shared_root(tmp_path_factory) -> Path:
    """A directory every pytest-xdist worker of this session sees (the base temp without xdist)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


_CACHE_FLAGS = {"jax_compilation_cache_dir": None,
                "jax_persistent_cache_min_compile_time_secs": 0.0,
                "jax_persistent_cache_min_entry_size_bytes": 0}


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    path = _shared_root(tmp_path_factory) / "train_test_jax_cache"
    old = {k: getattr(jax.config, k) for k in _CACHE_FLAGS}
    for k, v in {**_CACHE_FLAGS, "jax_compilation_cache_dir": str(path)}.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()
    yield path
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module", autouse=True)
def env(tmp_path_factory, compile_cache):
    """The fake offline cache ($HYPERMOE_CACHE) and a T5 stand-in vocabulary ($HYPERMOE_T5_SPM),
    set for this module (as tests/tasks_test.py does)."""
    root = tmp_path_factory.mktemp("train_env")
    cache = root / "cache"
    write_offline_cache(cache, wiki_repeat=100)  # 12.5 kB train, 697-byte validation split
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(PROSE * 2 + [
        "sst2 sentence: it 's a charming journey . positive negative",
        "the movie was dull , flat and far too long ; a charming , funny film ."]))
    spm = vocab_lib.train_sentencepiece([corpus], 400, root / "vocab", name="t5-stand-in")
    gins = root / "gin"
    gins.mkdir()
    (gins / "lm_sizes.gin").write_text(
        _SIZES_GIN.format(fn="decoder_only") + "sizes.decoder_only.num_decoder_layers = 2\n")
    (gins / "t5_sizes.gin").write_text(
        _SIZES_GIN.format(fn="sparse_t5") + "sizes.sparse_t5.num_encoder_layers = 2\n"
        "sizes.sparse_t5.num_decoder_layers = 2\n")
    (gins / "constant_lr.gin").write_text(_CONSTANT_LR_GIN)
    values = {cache_lib.CACHE_ENV: str(cache), vocab_lib.T5_SPM_ENV: str(spm),
              "JAX_COMPILATION_CACHE_DIR": str(compile_cache),
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield types.SimpleNamespace(root=root, cache=cache, spm=spm, gin=gins)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _macros(**kw) -> list[str]:
    return [f"--gin.{k}={v}" for k, v in kw.items()]


def lm_args(env, model_dir, *, model="hypermoe_lm_tiny", run="pretrain", steps=STEPS,
            extra=(), **macros) -> list[str]:
    """argv of a tiny LM run: model gin, sizes, run gin (pretrain: constant learning rate)."""
    files = [f"models/{model}.gin", str(env.gin / "lm_sizes.gin"), f"runs/{run}.gin"]
    if run == "pretrain":
        files.append(str(env.gin / "constant_lr.gin"))
    base = dict(LM_MACROS)
    if run in ("pretrain", "finetune"):
        base.update(MODEL_DIR=str(model_dir), TRAIN_STEPS=str(steps))
    if run == "finetune":
        base["LEARNING_RATE"] = LR
    if run in ("eval", "infer"):
        for k in ("LOG_EVERY", "EVAL_PERIOD", "CHECKPOINT_PERIOD"):
            base.pop(k)
    base.update(macros)
    return [f"--gin_file={f}" for f in files] + _macros(**base) + list(extra)


def run_summary(argv):
    """Parses argv as ``main`` does and returns what the run function returns."""
    files, bindings, paths, rest = gin_utils.parse_gin_args(argv)
    assert not rest, rest
    gin.clear_config()
    try:
        gin_utils.parse(files, bindings, paths)
        return cli.run()
    finally:
        gin.clear_config()


def run_main(argv) -> int:
    gin.clear_config()
    try:
        return cli.main(argv)
    finally:
        gin.clear_config()


class Spy:
    """Records the parameters every run starts from (each ``TrainState`` the trainer builds) and
    how often ``train_step`` is traced."""

    def __init__(self, monkeypatch):
        self.initial_params = []
        self.traces = 0
        make_step = train._make_train_step

        def state(**kw):
            self.initial_params.append(jax.device_get(kw["params"]))
            return ckpt_lib.TrainState(**kw)

        def counting_make_train_step(*args):
            step_fn = make_step(*args)

            def train_step(state, batch):  # (named as the original: the same compiled program)
                self.traces += 1
                return step_fn(state, batch)

            return train_step

        monkeypatch.setattr(train, "TrainState", state)
        monkeypatch.setattr(train, "_make_train_step", counting_make_train_step)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def load_state(step_dir) -> dict:
    """A checkpoint's state item, read with orbax directly (no trainer code)."""
    return ocp.StandardCheckpointer().restore(Path(step_dir).absolute() / "state")


def checkpoint_steps(directory) -> list[int]:
    """The steps orbax sees (committed checkpoints) in a checkpoint directory."""
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        return ckptr.all_steps()
    finally:
        ckptr.close()


def load_meta(step_dir) -> dict:
    return json.loads((Path(step_dir) / "meta" / "metadata").read_text())


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def assert_trees_equal(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@contextlib.contextmanager
def file_lock(path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared_run(tmp_path_factory, name, make):
    """``make(directory)`` once per session (the first worker to get here runs it, the others
    wait and reuse its directory and pickled result)."""
    root = _shared_root(tmp_path_factory)
    d = root / name
    with file_lock(root / f"{name}.lock"):
        done = root / f"{name}.pkl"
        if not done.exists():
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            result = make(d)
            done.write_bytes(pickle.dumps(result))
        return d, pickle.loads(done.read_bytes())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, env):
    """The tiny HyperMoE LM pretrained STEPS steps (checkpoints at 4 and 8, evals at 4 and 8),
    with the parameters it started from and the number of train_step traces."""

    def make(d):
        with pytest.MonkeyPatch.context() as mp:
            spy = Spy(mp)
            summary = run_summary(lm_args(env, d / "run"))
        return {"summary": summary, "initial_params": spy.initial_params,
                "traces": spy.traces}

    d, result = _shared_run(tmp_path_factory, "pretrained_hypermoe_lm", make)
    return types.SimpleNamespace(dir=d / "run", ckpt=d / "run" / "checkpoints", **result)


# ---------------------------------------------------------------------------------------------
# Pretraining, exact resume, SIGTERM, non-finite loss (the shared pretrained run)
# ---------------------------------------------------------------------------------------------


def test_pretrain_writes_checkpoints_metrics_and_events(pretrained):
    s = pretrained.summary
    assert s["status"] == "done" and s["step"] == STEPS
    losses = s["losses"]
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3, losses  # 8 steps at lr 0.01 lower it by ~1 nat
    assert pretrained.traces == 1  # one compilation of train_step for the whole run

    steps = sorted(int(p.name) for p in pretrained.ckpt.iterdir() if p.name.isdigit())
    assert steps == [4, 8]
    assert load_meta(pretrained.ckpt / "8") == {"batches_consumed": 8, "step": 8}
    assert int(load_state(pretrained.ckpt / "8")["step"]) == 8

    records = read_jsonl(pretrained.dir / "metrics.jsonl")
    train_recs = [r for r in records if r["split"] == "train"]
    eval_recs = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))  # LOG_EVERY = 1
    np.testing.assert_allclose([r["loss"] for r in train_recs], losses, rtol=1e-6)
    assert [r["step"] for r in eval_recs] == [4, 8]  # EVAL_PERIOD = 4; the last one reused
    assert eval_recs[-1]["loss"] == pytest.approx(s["eval"]["loss"])
    assert eval_recs[-1]["loss"] < eval_recs[0]["loss"]
    assert {"learning_rate", "tokens_per_second", "grad_norm"} <= set(train_recs[0])
    assert train_recs[0]["learning_rate"] == pytest.approx(float(LR))

    for split in ("train", "eval"):
        events = list((pretrained.dir / "tensorboard" / split).glob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), split


def test_resume_is_exact(pretrained, env, tmp_path):
    """STEPS/2 steps, stop, resume to STEPS: the same losses (bit for bit: data position, rng
    and optimizer state all resume) and the same final state as the straight run."""
    half = STEPS // 2
    # (On the command line a configurable is named by its module, not the run gin's alias.)
    argv = lm_args(env, tmp_path,
                   extra=[f"--gin.hypermoe_jax.training.train.train.stop_after_steps={half}"])
    first = run_summary(argv)
    assert first["status"] == "stopped" and first["step"] == half
    ckpt = tmp_path / "checkpoints"
    assert checkpoint_steps(ckpt) == [half]
    assert load_meta(ckpt / str(half)) == {"batches_consumed": half, "step": half}
    second = run_summary(argv)
    assert second["status"] == "done" and second["step"] == STEPS
    assert len(first["losses"]) == len(second["losses"]) == half

    np.testing.assert_array_equal(first["losses"] + second["losses"], pretrained.summary["losses"])
    assert load_meta(ckpt / str(STEPS)) == load_meta(pretrained.ckpt / str(STEPS))
    resumed, straight = load_state(ckpt / str(STEPS)), load_state(pretrained.ckpt / str(STEPS))
    assert_trees_equal(resumed, straight)  # step, params, optimizer state, rng
    assert flat(resumed["opt_state"])  # (the optimizer state is part of it)
    # The resumed run logged only its own steps, after the first run's.
    steps = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(pretrained, env, tmp_path):
    argv = lm_args(env, tmp_path, steps=100_000, CHECKPOINT_PERIOD="100000",
                   EVAL_PERIOD="100000")
    log = tmp_path / "stdout.txt"
    metrics = tmp_path / "metrics.jsonl"
    with log.open("w") as out:
        # (conftest's 8 CPU devices come with XLA_FLAGS; its matmul precision, which the
        # cached programs were compiled with, is set here.)
        sub_env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
        proc = subprocess.Popen([sys.executable, "-m", "hypermoe_jax.train", *argv], cwd=REPO,
                                env=sub_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 300
            while not (metrics.exists() and '"train"' in metrics.read_text()):
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    m = re.search(r"SIGTERM received: saving checkpoint at step (\d+) and stopping", text)
    assert m, text[-3000:]
    stopped = int(m.group(1))
    assert 0 < stopped < 100_000
    # CHECKPOINT_PERIOD never came: the one checkpoint is the SIGTERM save.
    assert checkpoint_steps(tmp_path / "checkpoints") == [stopped]
    assert load_meta(tmp_path / "checkpoints" / str(stopped)) == {
        "batches_consumed": stopped, "step": stopped}
    logged = [r["loss"] for r in read_jsonl(metrics) if r["split"] == "train"]
    assert len(logged) == stopped
    n = min(stopped, STEPS)  # the same run as the pretrained one, so far
    np.testing.assert_array_equal(logged[:n], pretrained.summary["losses"][:n])

    # Resuming for one more step starts from the SIGTERM checkpoint.
    resumed = run_summary(lm_args(env, tmp_path, steps=stopped + 1))
    assert resumed["step"] == stopped + 1 and len(resumed["losses"]) == 1
    steps = [r["step"] for r in read_jsonl(metrics) if r["split"] == "train"]
    assert steps == list(range(1, stopped + 2))


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(pretrained, env, tmp_path,
                                                                 capsys):
    """Resumed at step STEPS with a learning rate of 1e30: step STEPS + 1 still has a finite
    loss (the good parameters), its update overflows, and step STEPS + 2's loss is not finite.
    The checkpoint of step STEPS + 1 holds the overflowed parameters; the last good one is
    STEPS's."""
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained.dir, run_dir)
    rc = run_main(lm_args(env, run_dir, steps=STEPS + 4, CHECKPOINT_PERIOD="1",
                          LEARNING_RATE="1e30"))
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" not in err
    ckpt_dir = (run_dir / "checkpoints").absolute()
    assert re.search(rf"error: Loss became (nan|inf|-inf) at step {STEPS + 2}\b", err), err
    assert f"The last good checkpoint is step {STEPS} in {ckpt_dir}" in err, err
    assert "Lower the learning rate" in err

    logged = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert logged[-1]["step"] == STEPS + 1 and np.isfinite(logged[-1]["loss"])
    # The bad checkpoint is set aside (kept), the good one is the latest, untouched.
    assert checkpoint_steps(ckpt_dir) == [STEPS // 2, STEPS]
    assert f"moved to {ckpt_dir}_set_aside/{STEPS + 1}" in err, err
    assert checkpoint_steps(Path(f"{ckpt_dir}_set_aside")) == [STEPS + 1]
    good = load_state(ckpt_dir / str(STEPS))
    assert_trees_equal(good, load_state(pretrained.ckpt / str(STEPS)))
    assert all(np.isfinite(v).all() for v in flat(good["params"]).values())

    # A rerun with a sane learning rate resumes from it: its first step is the same step
    # STEPS + 1 (parameters, batch and rng) as the failed run's last finite one.
    rerun = run_summary(lm_args(env, run_dir, steps=STEPS + 1))
    assert rerun["step"] == STEPS + 1
    np.testing.assert_array_equal(rerun["losses"], [logged[-1]["loss"]])


# ---------------------------------------------------------------------------------------------
# GLUE (TFDS mock data), encoder-decoder
# ---------------------------------------------------------------------------------------------


def test_glue_sst2_finetune_with_accuracy(env, tmp_path, monkeypatch):
    """Switch (encoder-decoder, the T5 stand-in vocabulary): a checkpoint of its initialisation
    (pretrain.gin, stopped after 0 steps), fine-tuned 30 steps on SST-2 with finetune.gin,
    whose eval of decoded predictions gives the task's accuracy; then eval.gin on the fine-tuned
    checkpoint gives the same predictions and accuracy."""
    vocab = vocab_lib.t5_vocabulary()
    assert vocab.vocab_size <= 512
    files = ["models/switch_tiny.gin", str(env.gin / "t5_sizes.gin")]
    macros = {"MIXTURE_OR_TASK_NAME": "glue_sst2",
              "TASK_FEATURE_LENGTHS": "{'inputs': 32, 'targets': 8}", "BATCH_SIZE": "8",
              "NUM_EMBEDDINGS": "512", "LOG_EVERY": "1"}
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    # Mock data has no split metadata (file lists, sizes), which seqio reads to decide how to
    # shard and whether to cache in memory: none to report.
    monkeypatch.setattr(seqio.TfdsDataSource, "list_shards", lambda self, split: [])
    monkeypatch.setattr(seqio.TfdsDataSource, "num_input_examples", lambda self, split: None)
    with tfds.testing.mock_data(num_examples=16):
        run_summary([f"--gin_file={f}" for f in files + ["runs/pretrain.gin",
                                                         str(env.gin / "constant_lr.gin")]]
                    + _macros(**macros, MODEL_DIR=str(pre), TRAIN_STEPS="1") + STOP_AT_0)
        summary = run_summary(
            [f"--gin_file={f}" for f in files + ["runs/finetune.gin"]]
            + _macros(**macros, MODEL_DIR=str(ft), TRAIN_STEPS="30", LEARNING_RATE=LR,
                      INITIAL_CHECKPOINT_PATH=str(pre / "checkpoints")) + NO_EVAL)
        out = tmp_path / "eval"
        assert run_main([f"--gin_file={f}" for f in files + ["runs/eval.gin"]]
                        + _macros(**macros, CHECKPOINT_PATH=str(ft / "checkpoints"),
                                  EVAL_OUTPUT_DIR=str(out))) == 0
        labels = [int(ex["label"]) for ex in tfds.load("glue/sst2", split="validation")
                  .as_numpy_iterator()]
    assert checkpoint_steps(pre / "checkpoints") == [0]
    assert summary["status"] == "done" and all(np.isfinite(summary["losses"]))
    preds = read_jsonl(ft / "predictions_glue_sst2_validation.jsonl")
    # Whole batches of the validation split, in order; targets are the postprocessed labels.
    assert len(preds) == 16
    assert [int(p["target"]) for p in preds] == labels
    assert all(p["input"].startswith("sst2 sentence: ") for p in preds)
    # 30 steps teach it to answer with a label word (on random mock text, not the right one).
    assert {p["prediction"] for p in preds} & {"0", "1"}
    accuracy = 100 * np.mean([p["prediction"] == p["target"] for p in preds])
    assert summary["infer_eval"] == {"accuracy": pytest.approx(accuracy)}
    (rec,) = [r for r in read_jsonl(ft / "metrics.jsonl") if r["split"] == "infer_eval"]
    assert rec["step"] == 30 and rec["accuracy"] == pytest.approx(accuracy)

    evaluated = json.loads((out / "eval_metrics.json").read_text())
    assert evaluated["infer_eval"] == {"accuracy": pytest.approx(accuracy)}
    # The teacher-forced per-token accuracy (a fraction) is kept beside it, not overwritten.
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    assert np.isfinite(evaluated["loss"]) and "bits_per_token" in evaluated
    assert read_jsonl(out / "predictions_glue_sst2_validation.jsonl") == preds


# ---------------------------------------------------------------------------------------------
# Any-k evaluation (SMoE-Dropout)
# ---------------------------------------------------------------------------------------------


def test_eval_any_k_on_smoe_dropout(env, tmp_path):
    """A checkpoint of SMoE-Dropout's initialisation (NUM_SELECTED 4), evaluated with 1, 2 and
    4 experts per token."""
    ckpt = tmp_path / "run" / "checkpoints"
    run_summary(lm_args(env, tmp_path / "run", model="smoe_dropout_lm_tiny", extra=STOP_AT_0))
    out = tmp_path / "eval"
    rc = run_main(lm_args(env, None, model="smoe_dropout_lm_tiny", run="eval",
                          CHECKPOINT_PATH=str(ckpt), EVAL_OUTPUT_DIR=str(out),
                          ACTIVE_K_VALUES="(1, 2, 4)"))
    assert rc == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    per_k = metrics["active_k"]
    assert sorted(per_k) == ["1", "2", "4"]
    for k, m in per_k.items():
        assert m["moe/active_k"] == int(k) and np.isfinite(m["loss"])
    assert per_k["1"]["loss"] != per_k["2"]["loss"]
    # k = NUM_SELECTED (4) is the default evaluation.
    np.testing.assert_allclose(per_k["4"]["loss"], metrics["loss"], rtol=1e-5)
    assert metrics["loss"] != per_k["1"]["loss"]


# ---------------------------------------------------------------------------------------------
# Non-finite loss from scratch
# ---------------------------------------------------------------------------------------------


def test_nonfinite_loss_raises_nonfinitelosserror(env, tmp_path):
    """From scratch with lr 1e30 and a checkpoint every step: step 1's checkpoint holds the
    overflowed parameters, so no good checkpoint is left."""
    argv = lm_args(env, tmp_path, steps=4, CHECKPOINT_PERIOD="1", LEARNING_RATE="1e30")
    with pytest.raises(errors.NonFiniteLossError, match="at step 2 .*No good checkpoint is left"):
        run_summary(argv)
    assert checkpoint_steps(tmp_path / "checkpoints") == []
    assert checkpoint_steps(tmp_path / "checkpoints_set_aside") == [1]


# ---------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------


def test_finetune_hypermoe_from_a_switch_checkpoint(pretrained, env, tmp_path, capsys):
    """A Switch checkpoint (of its initialisation with seed 1: the parameters it shares with
    HyperMoE differ from HyperMoE's seed-0 initialisation) into the same-size HyperMoE."""
    switch_dir = tmp_path / "switch"
    run_summary(lm_args(env, switch_dir, model="switch_lm_tiny", extra=STOP_AT_0,
                        RANDOM_SEED="1"))
    switch_params = flat(load_state(switch_dir / "checkpoints" / "0")["params"])

    argv = lm_args(env, tmp_path / "ft", run="finetune", steps=1, extra=NO_EVAL,
                   INITIAL_CHECKPOINT_PATH=str(switch_dir / "checkpoints"))
    capsys.readouterr()
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Checkpoint ") and "does not match the model" in err
    assert "missing in checkpoint: ['params']['decoder']['hyper_generator']" in err
    assert "INITIAL_CHECKPOINT_ALLOW_MISSING = True" in err and "Traceback" not in err

    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        summary = run_summary(argv + ["--gin.INITIAL_CHECKPOINT_ALLOW_MISSING=True"])
    assert summary["status"] == "done"
    out = capsys.readouterr().out
    (start,) = [flat(p) for p in spy.initial_params]
    fresh = flat(pretrained.initial_params[0])  # a from-scratch run's initialisation (seed 0)
    assert start.keys() == fresh.keys()
    new = sorted(set(start) - set(switch_params))
    assert new and all(k.startswith("['decoder']['hyper_generator']") for k in new), new
    assert f"{len(new)} variables not in the checkpoint start from their initialisation" in out
    for k in switch_params:
        np.testing.assert_array_equal(start[k], switch_params[k], err_msg=k)
    for k in new:
        np.testing.assert_array_equal(start[k], fresh[k], err_msg=k)
    # (and the shared parameters really are the checkpoint's, not an initialisation)
    assert not np.array_equal(start["['token_embedder']['embedding']"],
                              fresh["['token_embedder']['embedding']"])


def test_finetune_starts_from_the_pretrained_parameters(pretrained, env, tmp_path, monkeypatch,
                                                        capsys):
    spy = Spy(monkeypatch)
    summary = run_summary(lm_args(env, tmp_path, run="finetune", steps=2,
                                  INITIAL_CHECKPOINT_PATH=str(pretrained.ckpt)))
    assert summary["status"] == "done" and summary["step"] == 2
    assert f"Initialised from {pretrained.ckpt}" in capsys.readouterr().out
    (start,) = spy.initial_params
    assert_trees_equal(start, load_state(pretrained.ckpt / str(STEPS))["params"])
    # Its own checkpoints count from 0; the pretrained run's directory is untouched.
    assert checkpoint_steps(tmp_path / "checkpoints") == [2]
    assert sorted(p.name for p in pretrained.ckpt.iterdir() if p.name.isdigit()) == ["4", "8"]
    # finetune.gin decodes the validation split at the end (wiki_char_lm has no metrics).
    assert summary["infer_eval"] == {}
    preds = read_jsonl(tmp_path / "predictions_wiki_char_lm_validation.jsonl")
    assert preds and {"input", "target", "prediction"} <= set(preds[0])


# ---------------------------------------------------------------------------------------------
# Eval and infer runs
# ---------------------------------------------------------------------------------------------


def test_eval_run_matches_the_trainers_eval(pretrained, env, tmp_path):
    out = tmp_path / "eval"
    rc = run_main(lm_args(env, None, run="eval", CHECKPOINT_PATH=str(pretrained.ckpt),
                          EVAL_OUTPUT_DIR=str(out)))
    assert rc == 0
    metrics = json.loads((out / "eval_metrics.json").read_text())
    # The same parameters, batches (EVAL_STEPS 2 of the validation split) and eval step as the
    # pretraining run's final eval.
    trained = pretrained.summary["eval"]
    assert metrics.keys() == trained.keys()
    for k in trained:
        np.testing.assert_allclose(metrics[k], trained[k], rtol=1e-5, err_msg=k)


def test_infer_run_writes_predictions(pretrained, env, tmp_path):
    out = tmp_path / "infer"
    rc = run_main(lm_args(env, None, run="infer", CHECKPOINT_PATH=str(pretrained.ckpt / "8"),
                          INFER_OUTPUT_DIR=str(out), MAX_BATCHES="1"))
    assert rc == 0
    assert json.loads((out / "infer_metrics.json").read_text()) == {}  # no metric_fns
    preds = read_jsonl(out / "predictions_wiki_char_lm_validation.jsonl")
    # One batch of validation examples, in order: targets are the split's first 8 x 32 bytes.
    raw = (env.cache / "wiki" / "char" / "validation.raw").read_bytes()
    assert len(preds) == 8
    assert "".join(p["target"] for p in preds) == raw[: 8 * 32].decode()
    assert all(isinstance(p["prediction"], str) for p in preds)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error each, exit code 1, no traceback
# ---------------------------------------------------------------------------------------------


def _error(argv, capsys) -> str:
    capsys.readouterr()
    assert run_main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def test_missing_required_macro(env, tmp_path, capsys):
    argv = [a for a in lm_args(env, tmp_path) if not a.startswith("--gin.TRAIN_STEPS=")]
    err = _error(argv, capsys)
    assert "Required gin macros are not set" in err
    assert re.search(r"TRAIN_STEPS: declared in \S*gin/runs/pretrain\.gin", err), err
    assert "--gin.TRAIN_STEPS=" in err
    assert "MODEL_DIR" not in err  # only what is missing


def test_unknown_task(env, tmp_path, capsys):
    err = _error(lm_args(env, tmp_path, MIXTURE_OR_TASK_NAME="wiki_char_llm"), capsys)
    assert "Unknown task or mixture 'wiki_char_llm'" in err
    assert "Did you mean: wiki_char_lm" in err and "Registered: " in err


def test_expert_count_not_divisible_by_the_expert_axis(env, tmp_path, capsys):
    err = _error(lm_args(env, tmp_path, NUM_EXPERTS="3", MESH_SHAPE="(4, 2, 1)"), capsys)
    assert "NUM_EXPERTS=3 is not divisible by the mesh's expert axis (2" in err, err


def test_mesh_that_does_not_fit_the_devices(env, tmp_path, capsys):
    err = _error(lm_args(env, tmp_path, MESH_SHAPE="(3, 1, 1)"), capsys)
    assert "MESH_SHAPE (3, 1, 1)" in err and "8 are available" in err, err


def test_empty_dataset(pretrained, env, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(cache))
    split = cache / "wiki" / "char"

    (split / "train.raw").write_bytes(b"")
    err = _error(lm_args(env, tmp_path / "a"), capsys)
    assert "Cannot read dataset 'wiki_char_lm' split 'train'" in err and "is empty" in err, err

    # 3 examples of 32 bytes: no batch of 8 (a train split would repeat; an eval split not).
    (split / "validation.raw").write_bytes(b"x" * 100)
    err = _error(lm_args(env, None, run="eval", CHECKPOINT_PATH=str(pretrained.ckpt),
                         EVAL_OUTPUT_DIR=str(tmp_path / "eval")), capsys)
    assert "Dataset 'wiki_char_lm' split 'validation' produced no batches of 8 examples" in err
    assert "lower BATCH_SIZE" in err


# ---------------------------------------------------------------------------------------------
# Multi-host detection
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_vars,multi", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "host0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host0,"}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"SLURM_NTASKS": "not-a-number"}, False),
    ({"JAX_COORDINATOR_ADDRESS": ""}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
])
def test_multihost_environment(env_vars, multi):
    assert cli._multihost_environment(env_vars) is multi


@pytest.mark.parametrize("argv,env_vars,calls", [
    (["--gin_file=a.gin"], {}, 0),
    (["--multiprocess", "--gin_file=a.gin"], {}, 1),
    (["--multiprocess_gpu", "--gin_file=a.gin"], {}, 1),
    (["--gin_file=a.gin"], {"SLURM_NTASKS": "2"}, 1),
    (["--gin_file=a.gin"], {"TPU_WORKER_HOSTNAMES": "a,b"}, 1),
    (["--single_process", "--gin_file=a.gin"], {"TPU_WORKER_HOSTNAMES": "a,b"}, 0),
    (["--single_process", "--multiprocess", "--gin_file=a.gin"], {}, 0),
])
def test_maybe_initialize_distributed(argv, env_vars, calls, monkeypatch):
    recorded = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: recorded.append((a, k)))
    rest = cli._maybe_initialize_distributed(argv, env_vars)
    assert rest == ["--gin_file=a.gin"]
    assert recorded == [((), {})] * calls


def test_main_initializes_distributed_before_parsing(monkeypatch, capsys):
    order = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: order.append("init"))
    monkeypatch.setattr(gin_utils, "parse", lambda *a, **k: order.append("parse") or [])
    monkeypatch.setattr(cli, "run", lambda: order.append("run"))
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert run_main(["--gin_file=x.gin"]) == 0
    assert order == ["init", "parse", "run"]


# ---------------------------------------------------------------------------------------------
# Progress lines (time-based, with rate and ETA; process 0 only)
# ---------------------------------------------------------------------------------------------


def test_progress_line_rate_eta_and_process_0_only(monkeypatch, capsys):
    now = [100.0]
    lines = []
    p = progress.Progress("eval", unit="batch", total=5, say=lines.append,
                          clock=lambda: now[0], interval_s=30.0)
    now[0] += 10.0  # the first batch (compilation) is not counted in the rate
    p.update(tokens=64)
    now[0] += 15.0
    p.update(tokens=64)
    now[0] += 5.0
    p.update(tokens=64)  # 30 s since the start: a line
    assert lines == ["eval: batch 3/5  0.10 batches/s  6 tok/s  elapsed 30s  ETA 20s"]
    now[0] += 5.0
    p.update(tokens=64)  # 5 s since the last line: none
    assert len(lines) == 1
    p.done()
    assert lines[-1] == "eval: 4 batches in 35s (0.11 batches/s, 7 tok/s)"

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    say = progress.process0_print()
    quiet = progress.Progress("eval", unit="batch", say=say, interval_s=0.0)
    quiet.update(tokens=1)
    quiet.done()
    say("nothing")
    assert capsys.readouterr().out == ""


def test_training_and_eval_print_progress(env, tmp_path, monkeypatch, capsys):
    """With lines due every step: time-based lines between the LOG_EVERY lines (which keep
    their format and add the step rate and ETA), and a line per eval batch."""
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    summary = run_summary(lm_args(env, tmp_path, steps=4, LOG_EVERY="2", EVAL_PERIOD="4",
                                  CHECKPOINT_PERIOD="100"))
    assert summary["status"] == "done"
    out = capsys.readouterr().out
    num = r"[\d.]+"
    for step in (1, 3):
        assert re.search(rf"^train: step {step}/4  {num} steps/s  \d+ tok/s  elapsed \S+  "
                         r"ETA \S+$", out, re.M), out
    assert re.search(rf"^step 2/4  loss {num}  .*  lr \S+  \d+ tok/s  {num} steps/s  ETA \S+$",
                     out, re.M), out
    assert re.search(rf"^step 4/4  loss {num}  .*  \d+ tok/s  {num} steps/s$", out, re.M), out
    assert re.search(rf"^eval @ step 4: batch 1/2  {num} batches/s  \d+ tok/s  elapsed \S+  "
                     r"ETA \S+$", out, re.M), out
    assert re.search(r"^eval @ step 4: 2 batches in \S+ \(", out, re.M), out
    assert re.search(r"^eval @ step 4: .*loss ", out, re.M), out  # the result line, as before


# ---------------------------------------------------------------------------------------------
# A failed run leaves no empty directories behind
# ---------------------------------------------------------------------------------------------


def test_a_failed_run_removes_the_empty_directories_it_created(pretrained, env, tmp_path,
                                                               capsys, monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(env.cache, cache)
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(cache))
    (cache / "wiki" / "char" / "train.raw").write_bytes(b"")
    (cache / "wiki" / "char" / "validation.raw").write_bytes(b"x" * 100)

    _error(lm_args(env, tmp_path / "new" / "deeper" / "run"), capsys)
    assert not (tmp_path / "new").exists()
    existing, empty = tmp_path / "existing", tmp_path / "empty"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    empty.mkdir()
    for model_dir in (existing, empty):
        _error(lm_args(env, model_dir), capsys)
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert empty.is_dir() and not list(empty.iterdir())
    for run, macro in (("eval", "EVAL_OUTPUT_DIR"), ("infer", "INFER_OUTPUT_DIR")):
        _error(lm_args(env, None, run=run, CHECKPOINT_PATH=str(pretrained.ckpt),
                       **{macro: str(tmp_path / run / "out")}), capsys)
        assert not (tmp_path / run).exists()


# ---------------------------------------------------------------------------------------------
# The train loop does not wait for each step's loss
# ---------------------------------------------------------------------------------------------


def test_train_loop_reads_each_loss_after_dispatching_the_next_step(pretrained, env, tmp_path,
                                                                   monkeypatch):
    """Records when each step is dispatched and when its loss is first read to the host (any
    read -- ``float``, ``np.asarray``, ``jax.device_get`` -- goes through the array's
    ``_value``): a loss read before the next step is dispatched stalls the device."""
    events, step_of, keep = [], {}, []
    real_jit = jax.jit

    def jit(fn, *args, **kwargs):
        compiled = real_jit(fn, *args, **kwargs)
        if getattr(fn, "__name__", "") != "train_step":
            return compiled

        def step(state, batch):
            n = len(keep) + 1
            events.append(("dispatch", n))
            state, metrics = compiled(state, batch)
            step_of[id(metrics["loss"])] = n
            keep.append(metrics["loss"])
            return state, metrics

        return step

    array_type = type(jax.numpy.zeros(()))
    value = array_type._value

    def read(self):
        if id(self) in step_of and ("read", step_of[id(self)]) not in events:
            events.append(("read", step_of[id(self)]))
        return value.fget(self)

    monkeypatch.setattr(jax, "jit", jit)
    monkeypatch.setattr(array_type, "_value", property(read))
    summary = run_summary(lm_args(env, tmp_path, extra=NO_EVAL, LOG_EVERY=str(STEPS),
                                  CHECKPOINT_PERIOD="100"))
    monkeypatch.undo()
    np.testing.assert_array_equal(summary["losses"], pretrained.summary["losses"])
    assert len(keep) == STEPS
    for n in range(1, STEPS):  # (step STEPS is a log step: its loss is read at once)
        assert events.index(("read", n)) > events.index(("dispatch", n + 1)), (n, events)


# ---------------------------------------------------------------------------------------------
# Decoding: this host's shard, unpacked
# ---------------------------------------------------------------------------------------------

SHARD_TEXTS = [f"line {i:02d} " + "ab" * (i % 4) for i in range(20)]


def _register_lines_task() -> str:
    """A task of 20 short numbered lines (bytes; 8-16 of them, so packing puts 2-3 in a row of
    32) whose targets say which example they are."""
    from tasks import common
    from tasks import preprocessors as pp

    name = "train_test_numbered_lines"
    common.add_task(
        name,
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                {"text": SHARD_TEXTS}),
            splits=["validation"]),
        preprocessors=[pp.text_to_targets, seqio.preprocessors.tokenize],
        output_features=common.lm_features(common.BYTE_VOCAB),
        metric_fns=[])
    return name


@pytest.mark.parametrize("pack", [False, True])
def test_infer_decodes_this_hosts_shard_unpacked(pretrained, env, tmp_path, monkeypatch,
                                                 capsys, pack):
    """Host 1 of 2 (BATCH_SIZE 16: 8 examples per host) decodes the examples of its shard
    (seqio deals examples round-robin: 1, 3, 5, ...), with their own targets; packed data is
    decoded unpacked, one example per row."""
    monkeypatch.setattr(evaluate, "host_shard", lambda: (1, 2))
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    out = tmp_path / "infer"
    rc = run_main(lm_args(env, None, run="infer", CHECKPOINT_PATH=str(pretrained.ckpt),
                          INFER_OUTPUT_DIR=str(out), MIXTURE_OR_TASK_NAME=_register_lines_task(),
                          BATCH_SIZE="16",
                          extra=[f"--gin.infer/hypermoe_jax.training.datasets.DatasetConfig.pack"
                                 f"={pack}"]))
    assert rc == 0
    preds = read_jsonl(out / "predictions_train_test_numbered_lines_validation.jsonl")
    assert [p["target"] for p in preds] == SHARD_TEXTS[1::2][:8]
    assert re.search(r"^infer: batch 1(/1)?  [\d.]+ batches/s  \d+ tok/s",
                     capsys.readouterr().out, re.M)


def test_infer_decodes_every_example_of_a_split_of_partial_batches(pretrained, env, tmp_path):
    """One host, 20 examples in batches of 8: the last batch is completed with padding rows and
    every example is decoded once, in order, with its own target (none is dropped)."""
    out = tmp_path / "infer"
    rc = run_main(lm_args(env, None, run="infer", CHECKPOINT_PATH=str(pretrained.ckpt),
                          INFER_OUTPUT_DIR=str(out), MIXTURE_OR_TASK_NAME=_register_lines_task(),
                          BATCH_SIZE="8"))
    assert rc == 0
    preds = read_jsonl(out / "predictions_train_test_numbered_lines_validation.jsonl")
    assert [p["target"] for p in preds] == SHARD_TEXTS
    assert all(isinstance(p["prediction"], str) for p in preds)


# ---------------------------------------------------------------------------------------------
# Any-k evaluation: k is static, one compiled eval step per k
# ---------------------------------------------------------------------------------------------


class _KModel:
    """A stand-in model whose eval loss is k times the mean target token: records the
    ``active_k`` each trace of ``eval_fn`` sees."""

    FEATURE_CONVERTER_CLS = seqio.DecoderFeatureConverter

    def __init__(self):
        self.traced = []

    def eval_fn(self, params, batch, *, flax_mutables=None, active_k=None):
        self.traced.append(active_k)
        k = 4 if active_k is None else active_k
        loss = params * k * jax.numpy.mean(batch["decoder_target_tokens"].astype("float32"))
        return loss, {"loss": loss, "moe/active_k": jax.numpy.asarray(k, "float32")}


def test_any_k_eval_compiles_one_step_per_static_k(env, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    model = _KModel()
    cfg = DatasetConfig("wiki_char_lm", {"targets": 32}, split="validation", batch_size=8,
                        shuffle=False)
    mesh = state_lib.make_mesh((-1, 1, 1), model)
    st = types.SimpleNamespace(params=jax.numpy.ones(()), flax_mutables={})
    lines = []
    base = evaluate.evaluate_loss(model, st, cfg, mesh, 2, say=lines.append)
    sweep = evaluate.any_k_sweep(model, st, cfg, mesh, 2, (1, 2, 4), say=lines.append)
    again = evaluate.any_k_sweep(model, st, cfg, mesh, 2, (2, 1), say=lines.append)
    assert model.traced == [None, 1, 2, 4]  # Python ints, each compiled once
    for k in ("1", "2", "4"):
        assert sweep[k]["moe/active_k"] == int(k)
        np.testing.assert_allclose(sweep[k]["loss"], base["loss"] * int(k) / 4, rtol=1e-6)
    assert again == {k: sweep[k] for k in ("2", "1")}
    assert [ln for ln in lines if re.match(r"  k=1 +loss [\d.]+  \(\S+\)$", ln)], lines
    assert [ln for ln in lines if re.match(r"eval k=2: batch 1/2  [\d.]+ batches/s", ln)], lines


_CACHE_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from hypermoe_jax.training import cli
env = json.loads(sys.argv[1])
where = cli.compilation_cache(env)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(7)).block_until_ready()
print(json.dumps({"dir": where, "max": jax.config.jax_compilation_cache_max_size}))
"""


@pytest.mark.parametrize("setting", ["dir", "default", "off", "jax_own"])
def test_compilation_cache(tmp_path, setting):
    """The CLI's persistent compilation cache: written to $HYPERMOE_COMPILATION_CACHE (default
    $HYPERMOE_CACHE/xla), off with 0, and JAX's own JAX_COMPILATION_CACHE_DIR kept where the
    user set it (a fresh process each: the setting is process-wide)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HYPERMOE_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    ours, jax_own = tmp_path / "ours", tmp_path / "jax_own"
    arg = {"dir": {"HYPERMOE_COMPILATION_CACHE": str(ours)},
           "default": {"HYPERMOE_CACHE": str(tmp_path / "root")},
           "off": {"HYPERMOE_COMPILATION_CACHE": "0"}, "jax_own": {}}[setting]
    if setting == "jax_own":
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax_own)
    proc = subprocess.run([sys.executable, "-c", _CACHE_PROBE, json.dumps(arg)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if setting == "dir":
        assert out["dir"] == str(ours)
        assert out["max"] == cli.COMPILATION_CACHE_MAX_BYTES
        assert any(p.name.endswith("-cache") for p in ours.iterdir())
    elif setting == "default":
        assert out["dir"] == str(tmp_path / "root" / "xla")
        assert any(p.name.endswith("-cache") for p in (tmp_path / "root" / "xla").iterdir())
    elif setting == "off":
        assert out["dir"] is None and not ours.exists()
    else:
        assert out["dir"] == str(jax_own)
        assert any(p.name.endswith("-cache") for p in jax_own.iterdir())
