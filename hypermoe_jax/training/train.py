"""Pretraining and fine-tuning: the gin run function ``train`` and its jitted train step.

``train`` checks the data, builds (or resumes) the ``TrainState`` on the mesh, runs the steps
-- logging, evaluating and checkpointing on their periods -- and evaluates the final parameters.
Checkpoints resume exactly: step, optimizer, rng (per-step keys are ``fold_in(seed_key, step)``)
and data position (batches consumed). SIGTERM saves a checkpoint and stops; a non-finite loss
stops the run, keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from hypermoe_jax import partitioning as part
from hypermoe_jax.training import checkpoints as ckpt_lib
from hypermoe_jax.training import optimizers
from hypermoe_jax.training.datasets import (
    DatasetConfig,
    first_batch,
    get_dataset,
    input_specs,
    num_target_tokens,
)
from hypermoe_jax.training.errors import NonFiniteLossError, RunError
from hypermoe_jax.training.evaluate import evaluate_loss, infer_evaluate
from hypermoe_jax.training.reporting import MetricsWriter, compute_metrics, eval_line, progress_line
from hypermoe_jax.training.state import (
    Initializer,
    TrainState,
    abstract,
    make_mesh,
    split_variables,
    to_global,
)

# --------------------------------------------------------------------------------------------
# The train step
# --------------------------------------------------------------------------------------------


def _call_loss(model, params, mutables, batch, rng, step):
    return model.loss_fn(params, batch, rng, flax_mutables=mutables, step=step)


def _make_train_step(model, tx, num_microbatches: int):
    def loss_and_grad(params, mutables, batch, rng, step):
        def f(p):
            loss, metrics = _call_loss(model, p, mutables, batch, rng, step)
            return loss, metrics

        return jax.value_and_grad(f, has_aux=True)(params)

    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if num_microbatches > 1:
            mb = jax.tree.map(
                lambda x: x.reshape(num_microbatches, x.shape[0] // num_microbatches, *x.shape[1:]),
                batch,
            )

            def body(carry, inputs):
                i, micro = inputs
                (loss, metrics), grads = loss_and_grad(
                    state.params, state.flax_mutables, micro, jax.random.fold_in(rng, i),
                    state.step,
                )
                acc_g, acc_l = carry
                acc_g = jax.tree.map(jnp.add, acc_g, grads)
                return (acc_g, acc_l + loss), metrics

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), metrics = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32)), (jnp.arange(num_microbatches), mb)
            )
            grads = jax.tree.map(lambda g: g / num_microbatches, grads)
            loss = loss / num_microbatches
            metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
        else:
            (loss, metrics), grads = loss_and_grad(
                state.params, state.flax_mutables, batch, rng, state.step
            )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(jnp.add, state.params, updates)
        grad_norm = jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2)
                                 for g in jax.tree.leaves(grads)))
        metrics = dict(metrics)
        metrics["loss"] = loss
        metrics["grad_norm"] = grad_norm
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new, metrics

    return train_step


# --------------------------------------------------------------------------------------------
# The run function
# --------------------------------------------------------------------------------------------


@gin.configurable
def train(
    *,
    model,
    train_dataset_cfg: DatasetConfig,
    model_dir: str,
    total_steps: int,
    optimizer: optimizers.OptimizerDef | None = None,
    train_eval_dataset_cfg: DatasetConfig | None = None,
    infer_eval_dataset_cfg: DatasetConfig | None = None,
    mesh_shape: Sequence[int] = (-1, 1, 1),
    eval_period: int = 1000,
    eval_steps: int = 20,
    checkpoint_period: int = 1000,
    keep_checkpoints: int = 3,
    async_checkpointing: bool = True,
    log_every: int = 10,
    num_microbatches: int = 1,
    random_seed: int = 0,
    initial_checkpoint_path: str | None = None,
    initial_checkpoint_allow_missing: bool = False,
    stop_after_steps: int | None = None,
    tensorboard: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Pretrains or fine-tunes ``model`` (fine-tuning: ``initial_checkpoint_path`` set).

    Resumes from the latest checkpoint in ``model_dir`` when there is one (the initial checkpoint
    is then ignored). ``initial_checkpoint_allow_missing``: variables of the model that the
    initial checkpoint lacks keep their initialisation (HyperMoE / MoE-Share fine-tuned from a
    Switch checkpoint); without it any difference is an error. ``stop_after_steps``
    ends this process after that many steps (testing / time-sliced jobs) with a checkpoint.
    Returns a summary: final step, last loss, status (``done`` / ``preempted`` / ``stopped``).
    """
    if total_steps <= 0:
        raise RunError(f"TRAIN_STEPS must be positive, got {total_steps}.")
    model_dir_p = Path(model_dir)
    model_dir_p.mkdir(parents=True, exist_ok=True)
    optimizer = optimizer or optimizers.make_optimizer()
    mesh = make_mesh(mesh_shape, model)
    say = print if (verbose and jax.process_index() == 0) else (lambda *a, **k: None)

    ckptr = ckpt_lib.Checkpointer(model_dir_p / "checkpoints", keep=keep_checkpoints,
                                  async_save=async_checkpointing)
    latest = ckptr.latest_step()
    input_shapes, input_types = _check_data(
        model, mesh, train_dataset_cfg, (train_eval_dataset_cfg, infer_eval_dataset_cfg),
        num_microbatches)
    init = Initializer(model, mesh, input_shapes, input_types)
    with part.axis_rules(mesh):
        state, batches_consumed = _initial_state(
            init, optimizer.tx, random_seed, ckptr, latest, initial_checkpoint_path,
            initial_checkpoint_allow_missing, say)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        say(f"Model: {n_params:,} trainable parameters; mesh {dict(mesh.shape)}")

        step_fn = jax.jit(_make_train_step(model, optimizer.tx, num_microbatches),
                          donate_argnums=(0,))
        ds = get_dataset(train_dataset_cfg, model.FEATURE_CONVERTER_CLS,
                         shard_id=jax.process_index(), num_shards=jax.process_count(),
                         skip_batches=batches_consumed)
        batches = ds.as_numpy_iterator()
        writer = MetricsWriter(model_dir_p, tensorboard=tensorboard)
        run = _Run(model=model, mesh=mesh, optimizer=optimizer, ckptr=ckptr, writer=writer,
                   say=say, eval_cfg=train_eval_dataset_cfg, eval_steps=eval_steps)
        try:
            start_step = int(state.step)
            end_step = total_steps if stop_after_steps is None else min(
                total_steps, start_step + stop_after_steps)
            loop = _run_steps(run, state, batches_consumed, step_fn, batches, end_step=end_step,
                              total_steps=total_steps, log_every=log_every,
                              eval_period=eval_period, checkpoint_period=checkpoint_period)
            state, step = loop.state, loop.step
            if step > start_step or latest is None:
                _save(ckptr, state, step, loop.batches_consumed, force=True)
            ckptr.wait()
            status = loop.status
            if status == "done" and step < total_steps:
                status = "stopped"
            summary = {"step": step, "status": status, "losses": loop.losses,
                       "checkpoint_dir": str(ckptr.directory)}
            if status == "done":
                summary.update(_final_evals(run, state, step, loop.last_eval,
                                            infer_eval_dataset_cfg, model_dir_p))
        finally:
            writer.close()
            ckptr.close()
    return summary


# --------------------------------------------------------------------------------------------
# Set-up: the data, the initial (or resumed) state
# --------------------------------------------------------------------------------------------


def _check_data(model, mesh, train_cfg: DatasetConfig,
                eval_cfgs: Sequence[DatasetConfig | None], num_microbatches: int):
    """Reads a first batch of the train data (and of each eval dataset: a split too small for
    one batch is bad input, found before any training) and checks that the batch splits into
    microbatches and over the mesh. Returns the model's ``(input_shapes, input_types)``."""
    converter = model.FEATURE_CONVERTER_CLS
    probe = get_dataset(train_cfg, converter, shard_id=jax.process_index(),
                        num_shards=jax.process_count())
    first, _ = first_batch(probe, train_cfg)
    for eval_cfg in eval_cfgs:
        if eval_cfg is not None:
            first_batch(get_dataset(eval_cfg, converter, shard_id=jax.process_index(),
                                    num_shards=jax.process_count(), num_epochs=1), eval_cfg)
    global_bs = train_cfg.batch_size
    if global_bs % num_microbatches:
        raise RunError(f"BATCH_SIZE {global_bs} is not divisible by num_microbatches "
                       f"{num_microbatches}.")
    shards = part.mesh_axis_size(mesh, part.TOKEN_SHARDS)
    if (global_bs // num_microbatches) % shards:
        raise RunError(
            f"The (micro)batch of {global_bs // num_microbatches} examples cannot be split over "
            f"data*expert={shards} devices; make BATCH_SIZE a multiple of "
            f"{shards * num_microbatches}."
        )
    return input_specs(first, global_bs)


def _initial_state(init: Initializer, tx, random_seed: int, ckptr: ckpt_lib.Checkpointer,
                   latest: int | None, initial_checkpoint_path: str | None,
                   allow_missing: bool, say: Callable) -> tuple[TrainState, int]:
    """The state the steps start from and the number of batches consumed before it: the latest
    checkpoint of ``ckptr`` if there is one, else a fresh initialisation -- with the parameters
    of ``initial_checkpoint_path`` when set. Call under ``part.axis_rules(mesh)``."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(random_seed))
    params, mutables = split_variables(init(init_rng))
    if initial_checkpoint_path and latest is None:
        params, loaded_mut, missing = ckpt_lib.restore_params(
            initial_checkpoint_path, abstract(params), abstract(mutables) or None,
            fallback_params=params if allow_missing else None,
            fallback_mutables=mutables if allow_missing else None,
        )
        mutables = loaded_mut or mutables
        say(f"Initialised from {initial_checkpoint_path}")
        if missing:
            say(f"  {len(missing)} variables not in the checkpoint start from their "
                f"initialisation: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    opt_state = jax.jit(tx.init)(params)
    # step and rng replicated on the mesh, as train_step returns them: otherwise the second
    # step sees new input shardings and compiles train_step again.
    replicated = NamedSharding(init.mesh, PartitionSpec())
    state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                       params=params, opt_state=opt_state, flax_mutables=mutables,
                       rng=jax.device_put(state_rng, replicated))
    batches_consumed = 0
    if latest is not None:
        state, meta = ckptr.restore(abstract(state))
        batches_consumed = int(meta.get("batches_consumed", int(state.step)))
        say(f"Resumed from {ckptr.directory}/{latest} (step {int(state.step)})")
    return state, batches_consumed


# --------------------------------------------------------------------------------------------
# The steps (preemption, a non-finite loss) and the evals at the end
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
    """What the steps and the final evals of one ``train`` call share."""

    model: Any
    mesh: jax.sharding.Mesh
    optimizer: optimizers.OptimizerDef
    ckptr: ckpt_lib.Checkpointer
    writer: MetricsWriter
    say: Callable
    eval_cfg: DatasetConfig | None
    eval_steps: int


@dataclasses.dataclass
class _Loop:
    """Where the steps ended: the state after them, and what a checkpoint and the summary
    record."""

    state: TrainState
    step: int
    batches_consumed: int
    status: str  # "done" (reached the end step) or "preempted"
    losses: list[float]
    last_eval: tuple[int, dict[str, Any]] | None  # (step, metrics) of the last periodic eval


def _save(ckptr: ckpt_lib.Checkpointer, state: TrainState, step: int, batches_consumed: int,
          force: bool = False) -> None:
    ckptr.save(state, {"batches_consumed": batches_consumed, "step": step}, force=force)


def _run_steps(run: _Run, state: TrainState, batches_consumed: int, step_fn, batches, *,
               end_step: int, total_steps: int, log_every: int, eval_period: int,
               checkpoint_period: int) -> _Loop:
    """Steps from ``state.step`` to ``end_step`` (fewer on SIGTERM), logging every
    ``log_every``, evaluating every ``eval_period`` and checkpointing every
    ``checkpoint_period`` steps (not at ``end_step``: the caller saves the final state)."""
    step = start_step = int(state.step)
    status = "done"
    history: list[float] = []
    last_eval: tuple[int, dict[str, Any]] | None = None
    t0, tokens = time.time(), 0
    with _Preemption() as preempt:
        while step < end_step:
            try:
                host_batch = next(batches)
            except StopIteration:
                raise RunError(
                    f"Training data ran out after {batches_consumed} batches; the train "
                    "dataset should repeat (num_epochs=None)."
                ) from None
            tokens += num_target_tokens(host_batch)
            state, metrics = step_fn(state, to_global(host_batch, run.mesh))
            batches_consumed += 1
            step += 1
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise NonFiniteLossError(_nonfinite_message(run.ckptr, loss, step, start_step))
            history.append(loss)
            if step % log_every == 0 or step == end_step:
                m = compute_metrics(metrics)
                m["tokens_per_second"] = tokens / max(time.time() - t0, 1e-9)
                m["learning_rate"] = float(run.optimizer.lr_at(step - 1))
                run.writer.write(step, "train", m)
                run.say(progress_line(step, total_steps, m))
                t0, tokens = time.time(), 0
            if run.eval_cfg is not None and eval_period and step % eval_period == 0:
                last_eval = (step, evaluate_loss(run.model, state, run.eval_cfg, run.mesh,
                                                 run.eval_steps))
                run.writer.write(step, "eval", last_eval[1])
                run.say(eval_line(f"eval @ step {step}", last_eval[1]))
            if step % checkpoint_period == 0 and step != end_step:
                _save(run.ckptr, state, step, batches_consumed)
            if preempt.requested:
                status = "preempted"
                run.say(f"SIGTERM received: saving checkpoint at step {step} and stopping.")
                break
    return _Loop(state, step, batches_consumed, status, history, last_eval)


class _Preemption:
    """Turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _nonfinite_message(ckptr: ckpt_lib.Checkpointer, loss: float, step: int,
                       start_step: int) -> str:
    """The loss of step ``step`` is that of the parameters after ``step - 1`` steps: a
    checkpoint of them (saved by this run) is set aside (moved, not deleted), so that a rerun
    resumes from the last checkpoint whose parameters gave a finite loss."""
    ckptr.wait()
    bad = step - 1
    note = ""
    if bad in ckptr.all_steps():
        if bad > start_step:
            moved = ckptr.set_aside(bad)
            note = (f" The checkpoint of step {bad} (those parameters) was moved to {moved}, so "
                    "that a rerun resumes from the last good one.")
        else:
            note = f" This run resumed from the checkpoint of step {bad}, which gives this loss."
    good = [s for s in ckptr.all_steps() if s < bad]
    where = (f"The last good checkpoint is step {good[-1]} in {ckptr.directory} (kept)."
             if good else f"No good checkpoint is left in {ckptr.directory}.")
    return (f"Loss became {loss} at step {step} (the parameters after step {bad}); stopping. "
            f"{where}{note} Lower the learning rate, enable gradient clipping, or check the "
            "data.")


def _final_evals(run: _Run, state: TrainState, step: int,
                 last_eval: tuple[int, dict[str, Any]] | None,
                 infer_eval_cfg: DatasetConfig | None, model_dir: Path) -> dict[str, Any]:
    """The evals of a finished run's final parameters, as summary entries: ``infer_eval``
    (decoded predictions of ``infer_eval_cfg``, written to ``model_dir``) and ``eval`` (the loss
    metrics; the last periodic eval's when it ran on these parameters)."""
    out: dict[str, Any] = {}
    if infer_eval_cfg is not None:
        out["infer_eval"] = infer_evaluate(run.model, state, infer_eval_cfg, run.mesh, model_dir)
        run.writer.write(step, "infer_eval", out["infer_eval"])
    if run.eval_cfg is not None:
        if last_eval is not None and last_eval[0] == step:
            em = last_eval[1]  # the periodic eval just ran on these parameters
        else:
            em = evaluate_loss(run.model, state, run.eval_cfg, run.mesh, run.eval_steps)
            run.writer.write(step, "eval", em)
            run.say(eval_line(f"eval @ step {step}", em))
        out["eval"] = {k: np.asarray(v).tolist() for k, v in em.items()}
    return out
