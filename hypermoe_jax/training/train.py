"""Pretraining and fine-tuning: the gin run function ``train`` and its jitted train step.

``train`` checks the data, builds (or resumes) the ``TrainState`` on the mesh, runs the steps
(``loop.run_steps``: logging, evaluating and checkpointing on their periods, with progress lines
-- rate, ETA -- in between) and evaluates the final parameters.
Checkpoints resume exactly: step, optimizer, rng (per-step keys are ``fold_in(seed_key, step)``)
and data position (batches consumed); a damaged latest checkpoint is set aside and the one
before it resumed. SIGTERM saves a checkpoint and stops; a non-finite loss stops the run,
keeping the last good checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
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
    host_shard,
    input_specs,
)
from hypermoe_jax.training.errors import RunError
from hypermoe_jax.training.evaluate import evaluate_loss, infer_evaluate
from hypermoe_jax.training.loop import Run, run_steps, save
from hypermoe_jax.training.outputs import removed_if_failed
from hypermoe_jax.training.progress import process0_print
from hypermoe_jax.training.reporting import MetricsWriter, eval_line
from hypermoe_jax.training.state import (
    Initializer,
    TrainState,
    abstract,
    make_mesh,
    split_variables,
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
    is then ignored); a damaged latest checkpoint is set aside and the one before it resumed.
    ``initial_checkpoint_allow_missing``: variables of the model that the
    initial checkpoint lacks keep their initialisation (HyperMoE / MoE-Share fine-tuned from a
    Switch checkpoint); without it any difference is an error. ``stop_after_steps``
    ends this process after that many steps (testing / time-sliced jobs) with a checkpoint.
    A run that fails removes the directories it created and left empty.
    Returns a summary: final step, last loss, status (``done`` / ``preempted`` / ``stopped``).
    """
    if total_steps <= 0:
        raise RunError(f"TRAIN_STEPS must be positive, got {total_steps}.")
    model_dir_p = Path(model_dir)
    optimizer = optimizer or optimizers.make_optimizer()
    say = process0_print(verbose)
    with removed_if_failed(model_dir_p, model_dir_p / "checkpoints"):
        model_dir_p.mkdir(parents=True, exist_ok=True)
        mesh = make_mesh(mesh_shape, model)
        ckptr = ckpt_lib.Checkpointer(model_dir_p / "checkpoints", keep=keep_checkpoints,
                                      async_save=async_checkpointing)
        try:
            input_shapes, input_types = _check_data(
                model, mesh, train_dataset_cfg, train_eval_dataset_cfg, infer_eval_dataset_cfg,
                num_microbatches)
            init = Initializer(model, mesh, input_shapes, input_types)
            with part.axis_rules(mesh):
                # Per-layer updates for scanned stacks (weight decay, Adafactor's factoring).
                axes = optimizers.logical_param_axes(init.boxed_abstract_variables())
                optimizer = dataclasses.replace(optimizer, tx=optimizer.transform(axes))
                state, batches_consumed, resumed = _initial_state(
                    init, optimizer.tx, random_seed, ckptr, initial_checkpoint_path,
                    initial_checkpoint_allow_missing, say)
                n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
                say(f"Model: {n_params:,} trainable parameters; mesh {dict(mesh.shape)}")
                run = Run(model=model, mesh=mesh, optimizer=optimizer, ckptr=ckptr,
                           writer=MetricsWriter(model_dir_p, tensorboard=tensorboard), say=say,
                           eval_cfg=train_eval_dataset_cfg, eval_steps=eval_steps,
                           model_dir=model_dir_p, total_steps=total_steps, log_every=log_every,
                           eval_period=eval_period, checkpoint_period=checkpoint_period)
                try:
                    return _train_from(run, state, batches_consumed, resumed, train_dataset_cfg,
                                       num_microbatches, stop_after_steps,
                                       infer_eval_dataset_cfg)
                finally:
                    run.writer.close()
        finally:
            ckptr.close()


def _train_from(run: Run, state: TrainState, batches_consumed: int, resumed: bool,
                train_cfg: DatasetConfig, num_microbatches: int, stop_after_steps: int | None,
                infer_eval_cfg: DatasetConfig | None) -> dict[str, Any]:
    """Runs the steps from ``state`` (the data after ``batches_consumed`` batches), saves the
    final checkpoint, evaluates a finished run; returns ``train``'s summary."""
    step_fn = jax.jit(_make_train_step(run.model, run.optimizer.tx, num_microbatches),
                      donate_argnums=(0,))
    shard_id, num_shards = host_shard()
    ds = get_dataset(train_cfg, run.model.FEATURE_CONVERTER_CLS, shard_id=shard_id,
                     num_shards=num_shards, skip_batches=batches_consumed)
    start_step = int(state.step)
    end_step = run.total_steps if stop_after_steps is None else min(
        run.total_steps, start_step + stop_after_steps)
    loop = run_steps(run, state, batches_consumed, step_fn, ds.as_numpy_iterator(),
                      end_step=end_step)
    state, step = loop.state, loop.step
    if step > start_step or not resumed:
        save(run.ckptr, state, step, loop.batches_consumed, force=True)
    run.ckptr.wait()
    status = loop.status
    if status == "done" and step < run.total_steps:
        status = "stopped"
    summary = {"step": step, "status": status, "losses": loop.losses,
               "checkpoint_dir": str(run.ckptr.directory)}
    if status == "done":
        summary.update(_final_evals(run, state, step, loop.last_eval, infer_eval_cfg))
    return summary


# --------------------------------------------------------------------------------------------
# Set-up: the data, the initial (or resumed) state
# --------------------------------------------------------------------------------------------


def _check_data(model, mesh, train_cfg: DatasetConfig, eval_cfg: DatasetConfig | None,
                infer_cfg: DatasetConfig | None, num_microbatches: int):
    """Reads a first batch of the train data (and of each eval dataset -- the one decoded
    unpacked, as it will be: a split too small for one batch is bad input, found before any
    training) and checks that the batch splits into microbatches and over the mesh. Returns the
    model's ``(input_shapes, input_types)``."""
    converter = model.FEATURE_CONVERTER_CLS
    shard_id, num_shards = host_shard()
    probe = get_dataset(train_cfg, converter, shard_id=shard_id, num_shards=num_shards)
    first, _ = first_batch(probe, train_cfg)
    if infer_cfg is not None:
        infer_cfg = dataclasses.replace(infer_cfg, pack=False)
    for cfg in (eval_cfg, infer_cfg):
        if cfg is not None:
            first_batch(get_dataset(cfg, converter, shard_id=shard_id, num_shards=num_shards,
                                    num_epochs=1), cfg)
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
                   initial_checkpoint_path: str | None, allow_missing: bool,
                   say: Callable) -> tuple[TrainState, int, bool]:
    """The state the steps start from, the number of batches consumed before it and whether it
    is resumed: the latest checkpoint of ``ckptr`` that restores (``restore_latest``) if there
    is one, else a fresh initialisation -- with the parameters of ``initial_checkpoint_path``
    when set. Call under ``part.axis_rules(mesh)``."""
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(random_seed))
    params, mutables = split_variables(init(init_rng))
    # step and rng replicated on the mesh, as train_step returns them: otherwise the second
    # step sees new input shardings and compiles train_step again.
    replicated = NamedSharding(init.mesh, PartitionSpec())
    fresh = functools.partial(TrainState, rng=jax.device_put(state_rng, replicated),
                              step=jax.device_put(jnp.zeros((), jnp.int32), replicated))
    opt_init = jax.jit(tx.init)
    if ckptr.all_steps():
        state = fresh(params=params, opt_state=opt_init(params), flax_mutables=mutables)
        state, meta = ckptr.restore_latest(abstract(state), warn=_warn)  # (raises if none can)
        say(f"Resumed from {ckptr.directory}/{int(state.step)} (step {int(state.step)})")
        return state, int(meta.get("batches_consumed", int(state.step))), True
    if initial_checkpoint_path:
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
    state = fresh(params=params, opt_state=opt_init(params), flax_mutables=mutables)
    return state, 0, False


def _warn(line: str) -> None:
    """A line every run prints (on process 0), verbose or not."""
    process0_print()(line)


# --------------------------------------------------------------------------------------------
# The evals at the end
# --------------------------------------------------------------------------------------------


def _final_evals(run: Run, state: TrainState, step: int,
                 last_eval: tuple[int, dict[str, Any]] | None,
                 infer_eval_cfg: DatasetConfig | None) -> dict[str, Any]:
    """The evals of a finished run's final parameters, as summary entries: ``infer_eval``
    (decoded predictions of ``infer_eval_cfg``, written to the model directory) and ``eval``
    (the loss metrics; the last periodic eval's when it ran on these parameters)."""
    out: dict[str, Any] = {}
    if infer_eval_cfg is not None:
        out["infer_eval"] = infer_evaluate(run.model, state, infer_eval_cfg, run.mesh,
                                           run.model_dir, say=run.say)
        run.writer.write(step, "infer_eval", out["infer_eval"])
    if run.eval_cfg is not None:
        if last_eval is not None and last_eval[0] == step:
            em = last_eval[1]  # the periodic eval just ran on these parameters
        else:
            em = evaluate_loss(run.model, state, run.eval_cfg, run.mesh, run.eval_steps,
                               label=f"eval @ step {step}", say=run.say)
            run.writer.write(step, "eval", em)
            run.say(eval_line(f"eval @ step {step}", em))
        out["eval"] = {k: np.asarray(v).tolist() for k, v in em.items()}
    return out
