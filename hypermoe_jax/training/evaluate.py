"""Evaluation: loss metrics of ``model.eval_fn`` (``evaluate_loss``), seqio metrics of decoded
predictions (``infer_evaluate``), and the two gin run functions that apply them to a
checkpoint, ``evaluate`` (runs/eval.gin) and ``infer`` (runs/infer.gin).

The trainer calls ``evaluate_loss`` periodically and ``infer_evaluate`` at the end of a run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gin
import jax
import jax.numpy as jnp
import numpy as np

from hypermoe_jax import partitioning as part
from hypermoe_jax.training import checkpoints as ckpt_lib
from hypermoe_jax.training.datasets import (
    DatasetConfig,
    first_batch,
    get_dataset,
    get_task,
    input_specs,
)
from hypermoe_jax.training.errors import RunError
from hypermoe_jax.training.reporting import compute_metrics, eval_line
from hypermoe_jax.training.state import (
    Initializer,
    TrainState,
    make_mesh,
    split_variables,
    to_global,
)


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
        _, metrics = eval_step(state.params, state.flax_mutables, to_global(host_batch, mesh))
        for name, v in compute_metrics(metrics).items():  # (not `k`: eval_step reads it)
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
        tokens, _ = predict(state.params, state.flax_mutables, to_global(host_batch, mesh))
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


def _restore_for_eval(model, cfg: DatasetConfig, checkpoint_path: str, mesh) -> TrainState:
    """The parameters (and non-trainable collections) of a checkpoint, sharded on ``mesh``; the
    model's input shapes come from the first batch of ``cfg``."""
    probe = get_dataset(cfg, model.FEATURE_CONVERTER_CLS, num_epochs=1)
    first, _ = first_batch(probe, cfg)
    init = Initializer(model, mesh, *input_specs(first, cfg.batch_size))
    with part.axis_rules(mesh):
        params, mutables = split_variables(init.abstract_variables())
        params, mutables, _ = ckpt_lib.restore_params(checkpoint_path, params, mutables or None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None,
                      flax_mutables=mutables, rng=jax.random.PRNGKey(0))


def _check_active_k(model, active_k_values: Sequence[int]) -> None:
    num_selected = model.config.moe.num_selected if model.config.moe else 1
    bad = [k for k in active_k_values if not 1 <= int(k) <= num_selected]
    if bad:
        raise RunError(
            f"active_k_values {list(active_k_values)} contain {bad}: the model routes "
            f"at most num_selected={num_selected} experts per token. Use values in "
            f"[1, {num_selected}] or a model with a larger NUM_SELECTED.")


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
    mesh = make_mesh(mesh_shape, model)
    out = Path(output_dir)
    state = _restore_for_eval(model, dataset_cfg, checkpoint_path, mesh)
    say = print if jax.process_index() == 0 else (lambda *a, **k: None)
    with part.axis_rules(mesh):
        result = {k: np.asarray(v).tolist()
                  for k, v in evaluate_loss(model, state, dataset_cfg, mesh, eval_steps).items()}
        say(eval_line(f"eval of {checkpoint_path}", result))
        if active_k_values:
            _check_active_k(model, active_k_values)
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
            say(eval_line("decoded predictions", infer_metrics))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_metrics.json").write_text(json.dumps(result, indent=2))
    return result


@gin.configurable
def infer(*, model, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
          mesh_shape: Sequence[int] = (-1, 1, 1), max_batches: int | None = None
          ) -> dict[str, Any]:
    """Writes decoded predictions of a checkpoint to ``output_dir`` (JSONL) and their metrics."""
    mesh = make_mesh(mesh_shape, model)
    out = Path(output_dir)
    state = _restore_for_eval(model, dataset_cfg, checkpoint_path, mesh)
    with part.axis_rules(mesh):
        metrics = infer_evaluate(model, state, dataset_cfg, mesh, out, max_batches)
    out.mkdir(parents=True, exist_ok=True)
    (out / "infer_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
