"""Gin-configured runs: pretrain / finetune (``train``), ``evaluate`` and ``infer``.

    python -m hypermoe_jax.train \
      --gin_file=models/hypermoe_tiny.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR=/tmp/run --gin.MIXTURE_OR_TASK_NAME=wiki_char_lm ...

The run gin picks the run function (``run.fn``); models follow the T5X ``BaseTransformerModel``
protocol (``loss_fn``, ``eval_fn``, ``predict_batch_with_aux``, ``get_initial_variables``,
``FEATURE_CONVERTER_CLS``). The train state is jitted with ``NamedSharding``s on a
(data, expert, model) mesh; checkpoints are orbax (async, keep-N) and resume exactly: step,
optimizer, rng (per-step keys are ``fold_in(seed_key, step)``) and data position (batches consumed).
SIGTERM saves a checkpoint and stops; a non-finite loss stops the run, keeping the last good
checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from hypermoe_jax import checkpoints as ckpt_lib
from hypermoe_jax import gin_utils, optimizers
from hypermoe_jax import partitioning as part

TrainState = ckpt_lib.TrainState


class RunError(RuntimeError):
    """A run cannot proceed (bad input); the message says what to fix."""


class NonFiniteLossError(RunError):
    pass


# Errors that mean bad input (configs, data, checkpoints): entry points print them as one
# ``error: ...`` line instead of a traceback.
USER_ERRORS = (gin_utils.GinConfigError, RunError, ckpt_lib.CheckpointMismatchError,
               FileNotFoundError)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@gin.configurable
@dataclasses.dataclass
class DatasetConfig:
    """Which seqio task/mixture to read, and how (as ``t5x.utils.DatasetConfig``)."""

    mixture_or_task_name: str
    task_feature_lengths: Mapping[str, int]
    split: str = "train"
    batch_size: int = 8
    shuffle: bool = True
    seed: int | None = 0
    pack: bool = False
    use_cached: bool = False
    module: str | None = None  # imported first, so that its tasks are registered


def _import_tasks(module: str | None) -> None:
    for name in ([module] if module else []) + ["tasks"]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            if name == module:
                raise RunError(f"Cannot import task module {module!r}.") from None


def get_task(name: str, module: str | None = None):
    import seqio

    _import_tasks(module)
    try:
        return seqio.get_mixture_or_task(name)
    except ValueError:
        names = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
        raise RunError(
            f"Unknown task or mixture {name!r}.{gin_utils.suggest(name, names)} Registered: "
            f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''}. Set "
            "MIXTURE_OR_TASK_NAME to one of them (tasks are registered by importing `tasks`)."
        ) from None


def get_dataset(
    cfg: DatasetConfig,
    feature_converter_cls,
    *,
    shard_id: int = 0,
    num_shards: int = 1,
    num_epochs: int | None = None,
    skip_batches: int = 0,
):
    """A batched, converted ``tf.data.Dataset`` of numpy-able dicts (per host)."""
    import seqio

    task = get_task(cfg.mixture_or_task_name, cfg.module)
    if cfg.batch_size % num_shards:
        raise RunError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts.")
    try:
        ds = task.get_dataset(
            sequence_length=dict(cfg.task_feature_lengths),
            split=cfg.split,
            use_cached=cfg.use_cached,
            shuffle=cfg.shuffle,
            seed=cfg.seed,
            num_epochs=num_epochs,
            shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        )
    except ValueError as e:  # e.g. an empty or unknown split
        raise RunError(
            f"Cannot read dataset {cfg.mixture_or_task_name!r} split {cfg.split!r}: {e}"
        ) from e
    converter = feature_converter_cls(pack=cfg.pack)
    ds = converter(ds, dict(cfg.task_feature_lengths))
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds


def _first_batch(ds, cfg: DatasetConfig):
    it = iter(ds.as_numpy_iterator())
    try:
        first = next(it)
    except StopIteration:
        raise RunError(
            f"Dataset {cfg.mixture_or_task_name!r} split {cfg.split!r} produced no batches of "
            f"{cfg.batch_size} examples (task_feature_lengths={dict(cfg.task_feature_lengths)}). "
            "Check that the data exists and is not empty, or lower BATCH_SIZE."
        ) from None
    return first, it


# --------------------------------------------------------------------------------------------
# Model / state plumbing
# --------------------------------------------------------------------------------------------


def _split_variables(variables) -> tuple[Any, dict]:
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def _call_loss(model, params, mutables, batch, rng, step):
    return model.loss_fn(params, batch, rng, flax_mutables=mutables, step=step)


def _compute_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "compute"):
            v = v.compute()
        out[k] = np.asarray(jax.device_get(v))
    return out


def _batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(part.TOKEN_SHARDS))


def _to_global(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    sharding = _batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def _num_target_tokens(batch) -> int:
    w = batch.get("decoder_loss_weights")
    if w is None:
        w = batch.get("decoder_target_tokens")
    return int(np.sum(np.asarray(w) > 0))


def _abstract(tree):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _make_mesh(mesh_shape: Sequence[int], model) -> jax.sharding.Mesh:
    """The (data, expert, model) mesh of ``MESH_SHAPE``; RunError when it does not fit the
    devices or the model's expert count."""
    try:
        mesh = part.make_mesh(*mesh_shape)
    except (ValueError, TypeError) as e:
        raise RunError(f"MESH_SHAPE {tuple(mesh_shape)}: {e}") from None
    moe = getattr(getattr(model, "config", None), "moe", None)
    n_expert = part.mesh_axis_size(mesh, part.EXPERT)
    if moe is not None and moe.num_experts % n_expert:
        raise RunError(
            f"NUM_EXPERTS={moe.num_experts} is not divisible by the mesh's expert axis "
            f"({n_expert}, MESH_SHAPE {tuple(mesh_shape)} -> {dict(mesh.shape)}); choose an "
            "expert-parallel size that divides the number of experts.")
    return mesh


class _Initializer:
    """Builds sharded initial variables on the mesh."""

    def __init__(self, model, mesh, input_shapes, input_types):
        self.model, self.mesh = model, mesh
        self.input_shapes, self.input_types = input_shapes, input_types

    def _init(self, rng):
        return self.model.get_initial_variables(rng, self.input_shapes, self.input_types)

    def shardings(self):
        with part.axis_rules(self.mesh):
            boxed = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        return part.params_shardings(self.mesh, boxed)

    def __call__(self, rng):
        shardings = self.shardings()
        with part.axis_rules(self.mesh):
            return jax.jit(lambda r: nn.unbox(self._init(r)), out_shardings=shardings)(rng)


# --------------------------------------------------------------------------------------------
# Metrics output
# --------------------------------------------------------------------------------------------


class MetricsWriter:
    """JSONL (+ TensorBoard event files) under ``model_dir``; only process 0 writes."""

    def __init__(self, model_dir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = model_dir / "metrics.jsonl"
        self._tb = {}
        self.tensorboard = tensorboard and self.enabled
        self.model_dir = model_dir

    def _writer(self, split):
        if split not in self._tb:
            import tensorflow as tf

            self._tb[split] = tf.summary.create_file_writer(
                str(self.model_dir / "tensorboard" / split)
            )
        return self._tb[split]

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split}
        for k, v in metrics.items():
            v = np.asarray(v)
            rec[k] = float(v) if v.ndim == 0 else v.tolist()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tensorboard:
            import tensorflow as tf

            with self._writer(split).as_default():
                for k, v in metrics.items():
                    v = np.asarray(v, np.float64)
                    if v.ndim == 0:
                        tf.summary.scalar(k, float(v), step=int(step))
                    else:
                        for i, x in enumerate(v.reshape(-1)):
                            tf.summary.scalar(f"{k}/{i}", float(x), step=int(step))
                self._writer(split).flush()

    def close(self):
        for w in self._tb.values():
            w.close()


def _fmt_usage(metrics: Mapping[str, Any]) -> list[str]:
    """One line per MoE layer: expert load as percentages, dropped fraction."""
    lines = []
    for k in sorted(metrics):
        if k.endswith("expert_load"):
            prefix = k[: -len("expert_load")]
            load = np.asarray(metrics[k]).reshape(-1)
            dropped = metrics.get(prefix + "dropped_fraction")
            pct = " ".join(f"{100 * x:4.1f}" for x in load)
            extra = f"  dropped {100 * float(dropped):.1f}%" if dropped is not None else ""
            lines.append(f"  {prefix.rstrip('/')}: [{pct}]%{extra}")
    return lines


# --------------------------------------------------------------------------------------------
# Train
# --------------------------------------------------------------------------------------------


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
    mesh = _make_mesh(mesh_shape, model)
    say = print if (verbose and jax.process_index() == 0) else (lambda *a, **k: None)

    converter = model.FEATURE_CONVERTER_CLS
    ckptr = ckpt_lib.Checkpointer(model_dir_p / "checkpoints", keep=keep_checkpoints,
                                  async_save=async_checkpointing)
    latest = ckptr.latest_step()
    probe = get_dataset(train_dataset_cfg, converter, shard_id=jax.process_index(),
                        num_shards=jax.process_count())
    first, _ = _first_batch(probe, train_dataset_cfg)
    # The eval data too, before any training: a split too small for one batch is bad input.
    for eval_cfg in (train_eval_dataset_cfg, infer_eval_dataset_cfg):
        if eval_cfg is not None:
            _first_batch(get_dataset(eval_cfg, converter, shard_id=jax.process_index(),
                                     num_shards=jax.process_count(), num_epochs=1), eval_cfg)
    global_bs = train_dataset_cfg.batch_size
    input_shapes = {k: (global_bs, *np.shape(v)[1:]) for k, v in first.items()}
    input_types = {k: np.asarray(v).dtype for k, v in first.items()}
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

    init = _Initializer(model, mesh, input_shapes, input_types)
    tx = optimizer.tx
    base_rng = jax.random.PRNGKey(random_seed)
    init_rng, state_rng = jax.random.split(base_rng)
    with part.axis_rules(mesh):
        variables = init(init_rng)
        params, mutables = _split_variables(variables)
        if initial_checkpoint_path and latest is None:
            fallback = initial_checkpoint_allow_missing
            params, loaded_mut, missing = ckpt_lib.restore_params(
                initial_checkpoint_path, _abstract(params), _abstract(mutables) or None,
                fallback_params=params if fallback else None,
                fallback_mutables=mutables if fallback else None,
            )
            mutables = loaded_mut or mutables
            say(f"Initialised from {initial_checkpoint_path}")
            if missing:
                say(f"  {len(missing)} variables not in the checkpoint start from their "
                    f"initialisation: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        opt_state = jax.jit(tx.init)(params)
        # step and rng replicated on the mesh, as train_step returns them: otherwise the second
        # step sees new input shardings and compiles train_step again.
        replicated = NamedSharding(mesh, PartitionSpec())
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                           params=params, opt_state=opt_state, flax_mutables=mutables,
                           rng=jax.device_put(state_rng, replicated))
        batches_consumed = 0
        if latest is not None:
            state, meta = ckptr.restore(_abstract(state))
            batches_consumed = int(meta.get("batches_consumed", int(state.step)))
            say(f"Resumed from {ckptr.directory}/{latest} (step {int(state.step)})")
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
        say(f"Model: {n_params:,} trainable parameters; mesh {dict(mesh.shape)}")

        step_fn = jax.jit(_make_train_step(model, tx, num_microbatches), donate_argnums=(0,))
        ds = get_dataset(train_dataset_cfg, converter, shard_id=jax.process_index(),
                         num_shards=jax.process_count(), skip_batches=batches_consumed)
        it = ds.as_numpy_iterator()
        writer = MetricsWriter(model_dir_p, tensorboard=tensorboard)
        try:
            step = int(state.step)
            start_step = step
            status = "done"
            history: list[float] = []
            last_eval: tuple[int, dict[str, Any]] | None = None
            t0, tokens = time.time(), 0
            end_step = total_steps if stop_after_steps is None else min(
                total_steps, step + stop_after_steps)

            def save(force=False):
                ckptr.save(state, {"batches_consumed": batches_consumed, "step": step}, force=force)

            with _Preemption() as preempt:
                while step < end_step:
                    try:
                        host_batch = next(it)
                    except StopIteration:
                        raise RunError(
                            f"Training data ran out after {batches_consumed} batches; the train "
                            "dataset should repeat (num_epochs=None)."
                        ) from None
                    tokens += _num_target_tokens(host_batch)
                    batch = _to_global(host_batch, mesh)
                    state, metrics = step_fn(state, batch)
                    batches_consumed += 1
                    step += 1
                    loss = float(metrics["loss"])
                    if not math.isfinite(loss):
                        raise NonFiniteLossError(_nonfinite_message(ckptr, loss, step, start_step))
                    history.append(loss)
                    if step % log_every == 0 or step == end_step:
                        m = _compute_metrics(metrics)
                        dt = max(time.time() - t0, 1e-9)
                        m["tokens_per_second"] = tokens / dt
                        m["learning_rate"] = float(optimizer.lr_at(step - 1))
                        writer.write(step, "train", m)
                        say(_progress_line(step, total_steps, m))
                        t0, tokens = time.time(), 0
                    if (train_eval_dataset_cfg is not None and eval_period
                            and step % eval_period == 0):
                        last_eval = (step, evaluate_loss(model, state, train_eval_dataset_cfg, mesh,
                                                         eval_steps))
                        writer.write(step, "eval", last_eval[1])
                        say(_eval_line(f"eval @ step {step}", last_eval[1]))
                    if step % checkpoint_period == 0 and step != end_step:
                        save()
                    if preempt.requested:
                        status = "preempted"
                        say(f"SIGTERM received: saving checkpoint at step {step} and stopping.")
                        break
            if step > start_step or latest is None:
                save(force=True)
            ckptr.wait()
            if status == "done" and step < total_steps:
                status = "stopped"
            summary = {"step": step, "status": status, "losses": history,
                       "checkpoint_dir": str(ckptr.directory)}
            if status == "done" and infer_eval_dataset_cfg is not None:
                summary["infer_eval"] = infer_evaluate(model, state, infer_eval_dataset_cfg, mesh,
                                                       model_dir_p)
                writer.write(step, "infer_eval", summary["infer_eval"])
            if status == "done" and train_eval_dataset_cfg is not None:
                if last_eval is not None and last_eval[0] == step:
                    em = last_eval[1]  # the periodic eval just ran on these parameters
                else:
                    em = evaluate_loss(model, state, train_eval_dataset_cfg, mesh, eval_steps)
                    writer.write(step, "eval", em)
                    say(_eval_line(f"eval @ step {step}", em))
                summary["eval"] = {k: np.asarray(v).tolist() for k, v in em.items()}
        finally:
            writer.close()
            ckptr.close()
    return summary


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


def _progress_line(step, total, m) -> str:
    parts = [f"step {step}/{total}", f"loss {float(m['loss']):.4f}"]
    for key in ("bits_per_token", "accuracy", "moe/load_balance_loss"):
        for k in m:
            if k.endswith(key) and np.ndim(m[k]) == 0:
                parts.append(f"{k} {float(m[k]):.4f}")
                break
    parts.append(f"lr {m['learning_rate']:.2e}")
    parts.append(f"{m['tokens_per_second']:.0f} tok/s")
    lines = ["  ".join(parts)]
    lines += _fmt_usage(m)
    return "\n".join(lines)


def _eval_line(label: str, m) -> str:
    """Scalar metrics on one line (per-layer MoE metrics as expert-usage lines below it)."""
    items = [f"{k} {float(v):.4f}" for k, v in sorted(m.items())
             if np.ndim(v) == 0 and not _PER_LAYER.match(k)]
    return "\n".join([f"{label}: " + "  ".join(items), *_fmt_usage(m)])


_PER_LAYER = re.compile(r"^moe/[^/]+/layer_\d+/")


# --------------------------------------------------------------------------------------------
# Eval / infer
# --------------------------------------------------------------------------------------------


def evaluate_loss(model, state, cfg: DatasetConfig, mesh, max_batches: int | None,
                  active_k: int | None = None):
    """Mean of ``model.eval_fn`` metrics over up to ``max_batches`` batches (one pass).

    ``active_k``: experts per token (any-k inference); None = the model's ``eval_active_k``.
    """
    ds = get_dataset(cfg, model.FEATURE_CONVERTER_CLS, shard_id=jax.process_index(),
                     num_shards=jax.process_count(), num_epochs=1)
    if active_k is None:
        eval_step = _eval_step(model, with_k=False)
    else:
        # k is a traced argument: one compilation serves every k of a sweep.
        k_step = _eval_step(model, with_k=True)
        k = jnp.asarray(active_k, jnp.int32)
        eval_step = lambda p, m, b: k_step(p, m, b, k)

    sums: dict[str, Any] = {}
    n = 0
    for i, host_batch in enumerate(ds.as_numpy_iterator()):
        if max_batches is not None and i >= max_batches:
            break
        _, metrics = eval_step(state.params, state.flax_mutables, _to_global(host_batch, mesh))
        for name, v in _compute_metrics(metrics).items():  # (not `k`: eval_step reads it)
            sums[name] = sums.get(name, 0.0) + v
        n += 1
    if n == 0:
        raise RunError(
            f"Eval dataset {cfg.mixture_or_task_name!r} split {cfg.split!r} produced no batches "
            f"of {cfg.batch_size}; check the data or lower the eval batch size."
        )
    return {k: v / n for k, v in sums.items()}


_EVAL_STEPS: dict[tuple[int, bool], tuple[Any, Callable]] = {}


def _eval_step(model, with_k: bool) -> Callable:
    """The jitted ``eval_fn`` of ``model`` -- ``(params, mutables, batch)``, or with ``with_k``
    ``(params, mutables, batch, k)`` with k traced -- made once per model, so periodic evals and
    k sweeps reuse one compilation."""
    key = (id(model), with_k)
    if key not in _EVAL_STEPS or _EVAL_STEPS[key][0] is not model:
        if with_k:
            fn = jax.jit(lambda p, m, b, k: model.eval_fn(p, b, flax_mutables=m, active_k=k))
        else:
            fn = jax.jit(lambda p, m, b: model.eval_fn(p, b, flax_mutables=m))
        _EVAL_STEPS[key] = (model, fn)
    return _EVAL_STEPS[key][1]


def _decode(vocab, tokens) -> str:
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if getattr(vocab, "eos_id", None) in tokens:
        tokens = tokens[: tokens.index(vocab.eos_id)]
    return vocab.decode([t for t in tokens if t > 0])


def infer_evaluate(model, state, cfg: DatasetConfig, mesh, out_dir: Path,
                   max_batches: int | None = None, write_predictions: bool = True):
    """Decodes ``cfg`` with ``model.predict_batch_with_aux`` and computes the task's seqio
    metrics (its ``metric_fns`` on postprocessed targets and predictions)."""
    task = get_task(cfg.mixture_or_task_name, cfg.module)
    ds = get_dataset(cfg, model.FEATURE_CONVERTER_CLS, shard_id=jax.process_index(),
                     num_shards=jax.process_count(), num_epochs=1)
    raw = task.get_dataset(sequence_length=dict(cfg.task_feature_lengths), split=cfg.split,
                           shuffle=False, num_epochs=1)

    @jax.jit
    def predict(params, mutables, batch):
        return model.predict_batch_with_aux(params, batch, flax_mutables=mutables)

    out_vocab = task.output_features["targets"].vocabulary
    preds, targets, inputs_txt = [], [], []
    raw_it = raw.as_numpy_iterator()
    for i, host_batch in enumerate(ds.as_numpy_iterator()):
        if max_batches is not None and i >= max_batches:
            break
        tokens, _ = predict(state.params, state.flax_mutables, _to_global(host_batch, mesh))
        tokens = np.asarray(jax.device_get(tokens))
        for row in tokens:
            ex = next(raw_it)
            text = _decode(out_vocab, row)
            preds.append(task.postprocess_fn(text, example=ex, is_target=False)
                         if task.postprocess_fn else text)
            tgt = ex.get("targets_pretokenized", ex.get("targets"))
            if isinstance(tgt, bytes):
                tgt = tgt.decode()
            elif not isinstance(tgt, str):
                tgt = _decode(out_vocab, tgt)
            targets.append(task.postprocess_fn(tgt, example=ex, is_target=True)
                           if task.postprocess_fn else tgt)
            inp = ex.get("inputs_pretokenized", b"")
            inputs_txt.append(inp.decode() if isinstance(inp, bytes) else str(inp))
    if not preds:
        raise RunError(f"No examples to infer in {cfg.mixture_or_task_name!r} {cfg.split!r}.")
    metrics: dict[str, float] = {}
    for fn in task.metric_fns:
        for k, v in fn(targets, preds).items():
            metrics[k] = float(getattr(v, "value", v))
    if write_predictions and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"predictions_{cfg.mixture_or_task_name}_{cfg.split}.jsonl"
        with path.open("w") as f:
            for inp, tgt, pred in zip(inputs_txt, targets, preds):
                f.write(json.dumps({"input": inp, "target": str(tgt), "prediction": str(pred)})
                        + "\n")
    return metrics


def _restore_for_eval(model, cfg: DatasetConfig, checkpoint_path: str, mesh):
    probe = get_dataset(cfg, model.FEATURE_CONVERTER_CLS, num_epochs=1)
    first, _ = _first_batch(probe, cfg)
    input_shapes = {k: (cfg.batch_size, *np.shape(v)[1:]) for k, v in first.items()}
    input_types = {k: np.asarray(v).dtype for k, v in first.items()}
    init = _Initializer(model, mesh, input_shapes, input_types)
    with part.axis_rules(mesh):
        abstract = jax.eval_shape(lambda: nn.unbox(init._init(jax.random.PRNGKey(0))))
        shardings = init.shardings()
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        params, mutables = _split_variables(abstract)
        params, mutables, _ = ckpt_lib.restore_params(checkpoint_path, params, mutables or None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                      flax_mutables=mutables, rng=jax.random.PRNGKey(0))


@gin.configurable
def evaluate(*, model, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
             mesh_shape: Sequence[int] = (-1, 1, 1), eval_steps: int | None = None,
             infer: bool = True, active_k_values: Sequence[int] | None = None
             ) -> dict[str, Any]:
    """Loss metrics (``eval_fn``) and, with ``infer``, seqio metrics of decoded predictions of a
    checkpoint; writes ``eval_metrics.json`` (and predictions) to ``output_dir``.

    ``active_k_values`` (e.g. ``(1, 2, 4, 8, 16)``): also evaluates the loss metrics with each
    number of experts per token from the same parameters (SMoE-Dropout / HyperRouter any-k
    inference), under ``result['active_k'][str(k)]``.
    """
    mesh = _make_mesh(mesh_shape, model)
    out = Path(output_dir)
    state = _restore_for_eval(model, dataset_cfg, checkpoint_path, mesh)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    with part.axis_rules(mesh):
        result = {k: np.asarray(v).tolist()
                  for k, v in evaluate_loss(model, state, dataset_cfg, mesh, eval_steps).items()}
        say(_eval_line(f"eval of {checkpoint_path}", result))
        if active_k_values:
            num_selected = model.config.moe.num_selected if model.config.moe else 1
            bad = [k for k in active_k_values if not 1 <= int(k) <= num_selected]
            if bad:
                raise RunError(
                    f"active_k_values {list(active_k_values)} contain {bad}: the model routes "
                    f"at most num_selected={num_selected} experts per token. Use values in "
                    f"[1, {num_selected}] or a model with a larger NUM_SELECTED.")
            result["active_k"] = {}
            for k in active_k_values:
                em = evaluate_loss(model, state, dataset_cfg, mesh, eval_steps, active_k=int(k))
                result["active_k"][str(int(k))] = {n: np.asarray(v).tolist()
                                                   for n, v in em.items()}
                say(f"  k={int(k):<3d} " + "  ".join(
                    f"{n} {float(em[n]):.4f}" for n in ("loss", "bits_per_token", "accuracy")
                    if n in em))
        task = get_task(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
        if infer and task.metric_fns:
            infer_metrics = infer_evaluate(model, state, dataset_cfg, mesh, out, eval_steps)
            result.update(infer_metrics)
            say(_eval_line("decoded predictions", infer_metrics))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2))
    return result


@gin.configurable
def infer(*, model, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
          mesh_shape: Sequence[int] = (-1, 1, 1), max_batches: int | None = None
          ) -> dict[str, Any]:
    """Writes decoded predictions of a checkpoint to ``output_dir`` (JSONL) and their metrics."""
    mesh = _make_mesh(mesh_shape, model)
    out = Path(output_dir)
    state = _restore_for_eval(model, dataset_cfg, checkpoint_path, mesh)
    with part.axis_rules(mesh):
        metrics = infer_evaluate(model, state, dataset_cfg, mesh, out, max_batches)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@gin.configurable
def run(fn: Callable[[], Any] = gin.REQUIRED):
    """The run gin binds ``run.fn`` to ``@train_script.train`` / ``evaluate`` / ``infer``."""
    if fn is gin.REQUIRED:
        raise gin_utils.GinConfigError(
            "No run function configured: include one of gin/runs/{pretrain,finetune,eval,infer}"
            ".gin (they set run.fn)."
        )
    return fn()


def _multihost_environment(env: Mapping[str, str]) -> bool:
    """Whether the environment describes one process of a multi-host job: a TPU pod slice
    (several ``TPU_WORKER_HOSTNAMES``), a SLURM job with several tasks, or an explicit
    coordinator address (``JAX_COORDINATOR_ADDRESS``)."""
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    try:
        if int(env.get("SLURM_NTASKS", "1")) > 1:
            return True
    except ValueError:
        pass
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def _maybe_initialize_distributed(argv: list[str], env: Mapping[str, str] | None = None
                                  ) -> list[str]:
    """Calls ``jax.distributed.initialize()`` (before anything touches a device) with
    ``--multiprocess`` or in a multi-host environment (``_multihost_environment``);
    ``--single_process`` turns the detection off. Returns the other arguments."""
    env = os.environ if env is None else env
    flags = {"--multiprocess", "--multiprocess_gpu", "--single_process"}
    rest = [a for a in argv if a not in flags]
    multi = ("--single_process" not in argv) and (
        bool(flags.intersection(argv) - {"--single_process"}) or _multihost_environment(env))
    if multi:
        jax.distributed.initialize()
    return rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    argv = _maybe_initialize_distributed(argv)
    files, bindings, paths, rest = gin_utils.parse_gin_args(argv)
    if rest:
        print(f"Unrecognised arguments: {rest}", file=sys.stderr)
        return 2
    try:
        gin_utils.parse(files, bindings, paths)
        result = run()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if isinstance(result, dict) and result.get("status") == "preempted":
        return 0
    return 0


if __name__ == "__main__":
    # Run the imported module's main, not this ``__main__`` copy: gin bindings and the error
    # classes raised by the run functions belong to ``hypermoe_jax.train``.
    from hypermoe_jax.train import main as _main

    sys.exit(_main())
