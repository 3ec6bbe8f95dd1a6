"""Evaluation: loss metrics of ``model.eval_fn`` (``evaluate_loss``; with each number of experts
per token, ``any_k_sweep``), seqio metrics of decoded predictions (``infer_evaluate``), and the
two gin run functions that apply them to a checkpoint, ``evaluate`` (runs/eval.gin) and
``infer`` (runs/infer.gin).

The trainer calls ``evaluate_loss`` periodically and ``infer_evaluate`` at the end of a run.
Long passes print progress lines (``progress``). Each host reads its shard of the data
(``datasets.host_shard``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
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
    host_shard,
    infer_batches,
    input_specs,
    num_target_tokens,
)
from hypermoe_jax.training.errors import RunError
from hypermoe_jax.training.outputs import removed_if_failed
from hypermoe_jax.training.progress import Progress, duration, process0_print
from hypermoe_jax.training.reporting import compute_metrics, eval_line
from hypermoe_jax.training.state import (
    Initializer,
    TrainState,
    make_mesh,
    split_variables,
    to_global,
    to_local,
)


def evaluate_loss(model, state, cfg: DatasetConfig, mesh, max_batches: int | None,
                  active_k: int | None = None, *, label: str = "eval",
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Mean of ``model.eval_fn`` metrics over up to ``max_batches`` batches (one pass).

    ``active_k``: experts per token (any-k inference), a static int: each k compiles its own
    eval step, sized for k; None = the model's ``eval_active_k``. Progress lines (``label:
    batch n/total ...``) go to ``say`` (default: printed on process 0) when the pass is long.
    """
    shard_id, num_shards = host_shard()
    ds = get_dataset(cfg, model.FEATURE_CONVERTER_CLS, shard_id=shard_id, num_shards=num_shards,
                     num_epochs=1)
    eval_step = _eval_step(model, None if active_k is None else int(active_k))
    key = _batches_key(cfg, num_shards)
    total = _total(max_batches, _NUM_BATCHES.get(key))
    progress = Progress(label, unit="batch", total=total, say=say)
    if max_batches is not None:
        ds = ds.take(max_batches)
    sums: dict[str, Any] = {}
    for host_batch in ds.as_numpy_iterator():
        _, metrics = eval_step(state.params, state.flax_mutables, to_global(host_batch, mesh))
        for name, v in compute_metrics(metrics).items():
            sums[name] = sums.get(name, 0.0) + v
        progress.update(tokens=num_target_tokens(host_batch))
    n = progress.count
    if n == 0:
        raise RunError(
            f"Eval dataset {cfg.mixture_or_task_name!r} split {cfg.split!r} produced no batches "
            f"of {cfg.batch_size}; check the data or lower the eval batch size."
        )
    if max_batches is None or n < max_batches:
        _NUM_BATCHES[key] = n  # the whole split: the total of the next pass
    progress.done()
    return {k: v / n for k, v in sums.items()}


# Batches in one pass over an eval split, by dataset (the total, and the ETA, of later passes).
_NUM_BATCHES: dict[tuple, int] = {}


def _batches_key(cfg: DatasetConfig, num_shards: int) -> tuple:
    return (cfg.mixture_or_task_name, cfg.split, cfg.batch_size, cfg.pack, num_shards,
            tuple(sorted(dict(cfg.task_feature_lengths).items())))


def _total(max_batches: int | None, known: int | None) -> int | None:
    if max_batches is None or known is None:
        return known if max_batches is None else max_batches
    return min(max_batches, known)


_EVAL_STEPS: dict[tuple[int, int | None], tuple[Any, Callable]] = {}


def _eval_step(model, active_k: int | None) -> Callable:
    """The jitted ``eval_fn`` of ``model`` with ``active_k`` experts per token (a Python int,
    static: the routing is sized for it; None = the model's default) --
    ``(params, mutables, batch) -> (loss, metrics)`` -- made once per model and k, so periodic
    evals and repeated k sweeps reuse their compilations."""
    key = (id(model), active_k)
    if key not in _EVAL_STEPS or _EVAL_STEPS[key][0] is not model:
        if active_k is None:
            fn = jax.jit(lambda p, m, b: model.eval_fn(p, b, flax_mutables=m))
        else:
            fn = jax.jit(lambda p, m, b: model.eval_fn(p, b, flax_mutables=m, active_k=active_k))
        _EVAL_STEPS[key] = (model, fn)
    return _EVAL_STEPS[key][1]


def any_k_sweep(model, state, cfg: DatasetConfig, mesh, max_batches: int | None,
                active_k_values: Sequence[int], say: Callable[[str], None] | None = None
                ) -> dict[str, dict[str, Any]]:
    """The loss metrics with each number of experts per token in ``active_k_values``, by
    ``str(k)``; prints a line per k with its time (and progress lines while it runs)."""
    say = process0_print() if say is None else say
    out = {}
    for k in active_k_values:
        k = int(k)
        t0 = time.monotonic()
        em = evaluate_loss(model, state, cfg, mesh, max_batches, active_k=k,
                           label=f"eval k={k}", say=say)
        out[str(k)] = {n: np.asarray(v).tolist() for n, v in em.items()}
        say(f"  k={k:<3d} " + "  ".join(
            f"{n} {float(em[n]):.4f}" for n in ("loss", "bits_per_token", "accuracy") if n in em)
            + f"  ({duration(time.monotonic() - t0)})")
    return out


def _decode(vocab, tokens) -> str:
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if getattr(vocab, "eos_id", None) in tokens:
        tokens = tokens[: tokens.index(vocab.eos_id)]
    return vocab.decode([t for t in tokens if t > 0])


def _record(task, vocab, ex: dict, predicted) -> tuple[str, Any, Any]:
    """``(input text, target, prediction)`` of one example, postprocessed as the task says."""
    post = task.postprocess_fn
    text = _decode(vocab, predicted)
    pred = post(text, example=ex, is_target=False) if post else text
    tgt = ex.get("targets_pretokenized", ex.get("targets"))
    if isinstance(tgt, bytes):
        tgt = tgt.decode()
    elif not isinstance(tgt, str):
        tgt = _decode(vocab, tgt)
    tgt = post(tgt, example=ex, is_target=True) if post else tgt
    inp = ex.get("inputs_pretokenized", b"")
    return inp.decode() if isinstance(inp, bytes) else str(inp), tgt, pred


def infer_evaluate(model, state, cfg: DatasetConfig, mesh, out_dir: Path,
                   max_batches: int | None = None, write_predictions: bool = True,
                   say: Callable[[str], None] | None = None) -> dict[str, float]:
    """Decodes ``cfg`` with ``model.predict_batch_with_aux`` and computes the task's seqio
    metrics (its ``metric_fns`` on postprocessed targets and predictions).

    Each host decodes its shard of the split, unpacked and in order (``infer_batches``), and
    pairs each row with the example it comes from; the metrics and predictions are this host's
    (process 0 writes its predictions).
    """
    task = get_task(cfg.mixture_or_task_name, cfg.module)
    shard_id, num_shards = host_shard()
    predict = jax.jit(lambda p, m, b: model.predict_batch_with_aux(p, b, flax_mutables=m)[0])
    out_vocab = task.output_features["targets"].vocabulary
    progress = Progress("infer", unit="batch", say=say, total=_total(
        max_batches, _NUM_BATCHES.get(_batches_key(dataclasses.replace(cfg, pack=False),
                                                   num_shards))))
    records = []
    batches = itertools.islice(infer_batches(cfg, model.FEATURE_CONVERTER_CLS,
                                             shard_id=shard_id, num_shards=num_shards),
                               max_batches)
    for host_batch, examples in batches:
        tokens = predict(state.params, state.flax_mutables, to_global(host_batch, mesh))
        rows = to_local(tokens, mesh)[:len(examples)]  # a last batch's padding rows dropped
        records += [_record(task, out_vocab, ex, row)
                    for ex, row in zip(examples, rows, strict=True)]
        progress.update(tokens=num_target_tokens(host_batch))
    progress.done()
    if not records:
        raise RunError(f"No examples to infer in {cfg.mixture_or_task_name!r} {cfg.split!r}.")
    _, targets, preds = (list(x) for x in zip(*records, strict=True))
    metrics: dict[str, float] = {}
    for fn in task.metric_fns:
        for k, v in fn(targets, preds).items():
            metrics[k] = float(getattr(v, "value", v))
    if write_predictions and jax.process_index() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"predictions_{cfg.mixture_or_task_name}_{cfg.split}.jsonl"
        with path.open("w") as f:
            for inp, tgt, pred in records:
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
    """Loss metrics (``eval_fn``) and, with ``infer``, seqio metrics of decoded predictions
    (under ``infer_eval``) of a checkpoint; writes ``eval_metrics.json`` (and predictions) to
    ``output_dir``.

    ``active_k_values`` (e.g. ``(1, 2, 4, 8, 16)``): also evaluates the loss metrics with each
    number of experts per token from the same parameters (SMoE-Dropout / HyperRouter any-k
    inference), under ``result['active_k'][str(k)]``.
    """
    mesh = make_mesh(mesh_shape, model)
    if active_k_values:
        _check_active_k(model, active_k_values)
    out = Path(output_dir)
    say = process0_print()
    with removed_if_failed(out):
        out.mkdir(parents=True, exist_ok=True)  # (an unwritable path fails before the work)
        state = _restore_for_eval(model, dataset_cfg, checkpoint_path, mesh)
        with part.axis_rules(mesh):
            result = {k: np.asarray(v).tolist() for k, v in evaluate_loss(
                model, state, dataset_cfg, mesh, eval_steps, say=say).items()}
            say(eval_line(f"eval of {checkpoint_path}", result))
            if active_k_values:
                result["active_k"] = any_k_sweep(model, state, dataset_cfg, mesh, eval_steps,
                                                 active_k_values, say=say)
            task = get_task(dataset_cfg.mixture_or_task_name, dataset_cfg.module)
            if infer and task.metric_fns:
                infer_metrics = infer_evaluate(model, state, dataset_cfg, mesh, out, eval_steps,
                                               say=say)
                # Beside the teacher-forced metrics (whose ``accuracy`` is per token), as the
                # trainer's summary keeps them: under ``infer_eval``.
                result["infer_eval"] = infer_metrics
                say(eval_line("decoded predictions", infer_metrics))
        (out / "eval_metrics.json").write_text(json.dumps(result, indent=2))
    return result


@gin.configurable
def infer(*, model, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
          mesh_shape: Sequence[int] = (-1, 1, 1), max_batches: int | None = None
          ) -> dict[str, Any]:
    """Writes decoded predictions of a checkpoint to ``output_dir`` (JSONL) and their metrics."""
    mesh = make_mesh(mesh_shape, model)
    out = Path(output_dir)
    with removed_if_failed(out):
        out.mkdir(parents=True, exist_ok=True)  # (an unwritable path fails before the work)
        # (decoded unpacked: the input shapes are those of unpacked batches)
        state = _restore_for_eval(model, dataclasses.replace(dataset_cfg, pack=False),
                                  checkpoint_path, mesh)
        with part.axis_rules(mesh):
            metrics = infer_evaluate(model, state, dataset_cfg, mesh, out, max_batches)
        (out / "infer_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
