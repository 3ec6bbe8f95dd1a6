"""Reliability of training runs: a run killed with SIGKILL at random steps resumes to the same
losses and parameters, bit for bit, as one uninterrupted run; a corrupted latest checkpoint is set
aside (moved, never deleted) and the run resumes from the one before it.

The fixtures are train_test's: the fake offline data cache, the compilation cache shared with the
pytest-xdist workers, and the shared pretrained run -- the uninterrupted reference (STEPS steps of
the tiny HyperMoE LM, checkpoints at STEPS / 2 and STEPS).
"""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_test
from train_test import (
    NO_EVAL,
    REPO,
    STEPS,
    assert_trees_equal,
    checkpoint_steps,
    lm_args,
    load_state,
    read_jsonl,
    run_summary,
)

from hypermoe_jax.training import checkpoints as ckpt_lib
from hypermoe_jax.training import errors
from hypermoe_jax.training.state import TrainState, abstract

# train_test's fixtures, for this module too (compile_cache and env are autouse).
compile_cache = train_test.compile_cache
env = train_test.env
pretrained = train_test.pretrained

KILLS = 3  # runs killed, at distinct steps drawn with SEED
SEED = 0

# Runs cli.main and SIGKILLs itself at step argv[1]: right after that step's train metrics are
# written ("log": the previous step's checkpoint may still be being written in the background),
# or right after that step's checkpoint save has started ("save": it is being written).
_KILL_DRIVER = """
import os, signal, sys
from hypermoe_jax.training import checkpoints, cli, reporting

kill_at, where = int(sys.argv[1]), sys.argv[2]
write, save = reporting.MetricsWriter.write, checkpoints.Checkpointer.save

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def write_then_kill(self, step, split, metrics):
    write(self, step, split, metrics)
    if where == "log" and split == "train" and step == kill_at:
        kill()

def save_then_kill(self, state, meta, force=False):
    saved = save(self, state, meta, force=force)
    if where == "save" and meta["step"] == kill_at:
        kill()
    return saved

reporting.MetricsWriter.write = write_then_kill
checkpoints.Checkpointer.save = save_then_kill
sys.exit(cli.main(sys.argv[3:]))
"""


def test_sigkill_at_random_steps_then_resume_is_exact(pretrained, env, tmp_path):
    """KILLS runs of the pretraining (a checkpoint every step) killed at random steps, each
    resuming the last; a final run finishes: every logged loss, the final losses and the final
    state equal the uninterrupted run's."""
    rng = random.Random(SEED)
    kills = sorted(rng.sample(range(1, STEPS), KILLS))
    argv = lm_args(env, tmp_path, extra=NO_EVAL, CHECKPOINT_PERIOD="1")
    # (conftest's 8 CPU devices come with XLA_FLAGS; its matmul precision is set here.)
    sub_env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONUNBUFFERED="1")
    for step in kills:
        where = rng.choice(["log", "save"])
        proc = subprocess.run([sys.executable, "-c", _KILL_DRIVER, str(step), where, *argv],
                              cwd=REPO, env=sub_env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -signal.SIGKILL, (proc.stdout + proc.stderr)[-3000:]
        logged = [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")]
        assert logged[-1] == step, (logged, proc.stdout[-3000:])

    summary = run_summary(argv)
    assert summary["status"] == "done" and summary["step"] == STEPS
    reference = pretrained.summary["losses"]
    assert 0 < len(summary["losses"]) < STEPS  # it resumed
    np.testing.assert_array_equal(summary["losses"], reference[-len(summary["losses"]):])
    logged = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert {r["step"] for r in logged} == set(range(1, STEPS + 1))
    assert len(logged) > STEPS  # the steps after each run's last checkpoint ran twice
    for r in logged:
        assert r["loss"] == reference[r["step"] - 1], r
    ckpt = tmp_path / "checkpoints"
    assert_trees_equal(load_state(ckpt / str(STEPS)), load_state(pretrained.ckpt / str(STEPS)))


def test_a_corrupted_latest_checkpoint_is_set_aside_and_the_run_resumes(pretrained, env,
                                                                        tmp_path, capsys):
    """The pretrained run's checkpoint STEPS with its array data truncated: the resumed run
    moves it aside, says so in one line, resumes from STEPS / 2 and reproduces STEPS."""
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained.dir, run_dir)
    ckpt = (run_dir / "checkpoints").absolute()
    _truncate_array_data(ckpt / str(STEPS))
    summary = run_summary(lm_args(env, run_dir, extra=NO_EVAL))
    out = capsys.readouterr().out
    aside = Path(f"{ckpt}_set_aside") / str(STEPS)
    (line,) = [ln for ln in out.splitlines() if str(aside) in ln]
    assert f"{ckpt}/{STEPS}" in line, line
    assert f"Resumed from {ckpt}/{STEPS // 2} (step {STEPS // 2})" in out
    assert checkpoint_steps(Path(f"{ckpt}_set_aside")) == [STEPS]  # kept, with its files
    assert summary["status"] == "done" and summary["step"] == STEPS
    np.testing.assert_array_equal(summary["losses"], pretrained.summary["losses"][STEPS // 2:])
    assert_trees_equal(load_state(ckpt / str(STEPS)), load_state(pretrained.ckpt / str(STEPS)))


def _truncate_array_data(step_dir: Path) -> None:
    data = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


# ---------------------------------------------------------------------------------------------
# The checkpointer on its own: what is corrupt, what is another model's
# ---------------------------------------------------------------------------------------------


def _state(scale: float, shape=(4, 8)) -> TrainState:
    params = {"w": jnp.full(shape, scale), "b": jnp.arange(8.0) * scale}
    return TrainState(step=jnp.asarray(int(scale), jnp.int32), params=params,
                      opt_state=optax.adam(1e-3).init(params), flax_mutables={},
                      rng=jax.random.PRNGKey(0))


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncate data":
        _truncate_array_data(step_dir)
    elif how == "delete metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "delete manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    elif how == "delete state":
        shutil.rmtree(step_dir / "state")
    elif how == "truncate meta":
        (step_dir / "meta" / "metadata").write_text('{"step": ')


@pytest.mark.parametrize("how", ["truncate data", "delete metadata", "delete manifest",
                                 "delete state", "truncate meta"])
def test_restore_latest_sets_a_corrupted_checkpoint_aside(tmp_path, how):
    directory = tmp_path / "checkpoints"
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    for step in (1, 2, 3):
        ckptr.save(_state(step), {"step": step})
    ckptr.close()
    _damage(directory / "3", how)
    lines = []
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        state, meta = ckptr.restore_latest(abstract(_state(0)), warn=lines.append)
    finally:
        ckptr.close()
    assert meta == {"step": 2} and int(state.step) == 2
    np.testing.assert_array_equal(state.params["w"], np.full((4, 8), 2.0))
    (line,) = lines
    assert f"{directory}/3" in line and f"{directory}_set_aside/3" in line, line
    assert checkpoint_steps(directory) == [1, 2]
    assert (tmp_path / "checkpoints_set_aside" / "3").is_dir()


def test_a_checkpoint_of_another_model_is_an_error_and_stays(tmp_path):
    directory = tmp_path / "checkpoints"
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        for step in (1, 2):
            ckptr.save(_state(step), {"step": step})
        with pytest.raises(errors.CheckpointMismatchError, match=f"{directory}/2 does not"):
            ckptr.restore_latest(abstract(_state(0, shape=(4, 9))), warn=print)
        assert ckptr.all_steps() == [1, 2]
        assert ckptr.restore_latest(abstract(_state(0)), warn=print)[1] == {"step": 2}
    finally:
        ckptr.close()
    assert not (tmp_path / "checkpoints_set_aside").exists()


def test_a_lone_damaged_checkpoint_is_an_error_and_stays(tmp_path):
    """With no earlier checkpoint to tell damage from a model change, nothing is moved."""
    directory = tmp_path / "checkpoints"
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    ckptr.save(_state(1), {"step": 1})
    ckptr.close()
    _truncate_array_data(directory / "1")
    ckptr = ckpt_lib.Checkpointer(directory, async_save=False)
    try:
        with pytest.raises((errors.RunError, errors.CheckpointMismatchError),
                           match=f"(?s){directory}/1 .*damaged.* move it out of {directory}"):
            ckptr.restore_latest(abstract(_state(0)), warn=print)
        assert ckptr.all_steps() == [1]
    finally:
        ckptr.close()
    assert not (tmp_path / "checkpoints_set_aside").exists()
