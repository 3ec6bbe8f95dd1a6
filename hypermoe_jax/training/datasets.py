"""The data of a run: which seqio task or mixture to read (``DatasetConfig``, bound in the run
gins) and its batched, feature-converted ``tf.data`` pipeline, sharded over hosts
(``host_shard``); for decoding, unpacked batches with the examples they hold (``infer_batches``).

Tasks are registered by importing the ``tasks`` package (and ``DatasetConfig.module``, if set).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator, Mapping

import gin
import numpy as np

from hypermoe_jax.training import gin_utils
from hypermoe_jax.training.errors import RunError

PREFETCH_BATCHES = 2  # batches a pipeline keeps ready while the device steps


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


def host_shard() -> tuple[int, int]:
    """``(shard_id, num_shards)`` of the data this process reads: its index and the number of
    processes (each host reads its own part of every global batch)."""
    import jax

    return jax.process_index(), jax.process_count()


def _task_dataset(cfg: DatasetConfig, *, shuffle: bool, shard_id: int, num_shards: int,
                  num_epochs: int | None):
    """The task's preprocessed examples (before the feature converter), this shard's."""
    import seqio

    task = get_task(cfg.mixture_or_task_name, cfg.module)
    if cfg.batch_size % num_shards:
        raise RunError(f"batch_size {cfg.batch_size} is not divisible by {num_shards} hosts.")
    try:
        ds = task.get_dataset(
            sequence_length=dict(cfg.task_feature_lengths),
            split=cfg.split,
            use_cached=cfg.use_cached,
            shuffle=shuffle,
            seed=cfg.seed,
            num_epochs=num_epochs,
            shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        )
    except ValueError as e:  # e.g. an empty or unknown split
        raise RunError(
            f"Cannot read dataset {cfg.mixture_or_task_name!r} split {cfg.split!r}: {e}"
        ) from e
    return ds.with_options(pipeline_options())


@gin.configurable
def pipeline_options(autotune: bool = True):
    """The ``tf.data.Options`` of every pipeline here (the datasets built on one inherit them).

    tf.data's autotuning is on by default, as in T5X: in side-by-side runs
    (``benchmarks/results/t5x_trainer_autotune_ab.json``) the training loop was faster with it
    (1.83 vs 1.68 steps/s by the trainer's own report). Its cost: deleting an iterator -- at the
    end of a run, after an eval -- waits for the optimisation pass in progress (one 2-core run in
    three ended 6-15 s later). ``pipeline_options.autotune = False`` turns it off: no such wait,
    the maps seqio asks ``AUTOTUNE`` of run on all cores, and ``get_dataset`` keeps
    ``PREFETCH_BATCHES`` ready either way."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = bool(autotune)
    return options


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
    ds = _task_dataset(cfg, shuffle=cfg.shuffle, shard_id=shard_id, num_shards=num_shards,
                       num_epochs=num_epochs)
    converter = feature_converter_cls(pack=cfg.pack)
    ds = converter(ds, dict(cfg.task_feature_lengths))
    ds = ds.batch(cfg.batch_size // num_shards, drop_remainder=True)
    if skip_batches:
        ds = ds.skip(skip_batches)
    return ds.prefetch(PREFETCH_BATCHES)


def infer_batches(cfg: DatasetConfig, feature_converter_cls, *, shard_id: int = 0,
                  num_shards: int = 1) -> Iterator[tuple[dict[str, np.ndarray], list[dict]]]:
    """Batches to decode, each with the task's examples in its rows: ``(batch, examples)``.

    One example per row -- unpacked, whatever ``cfg.pack`` says (decoding continues one
    prompt per row) -- in the split's order (no shuffling), this host's shard, batches of
    ``cfg.batch_size // num_shards`` rows. The converted examples are zipped with the examples
    they come from (two passes over one unshuffled pipeline), so targets and predictions pair
    up on any number of hosts.

    On one host the last batch is completed with all-padding rows, and its ``examples`` list
    only the real ones: every example of the split is decoded (the caller keeps the first
    ``len(examples)`` rows). On several hosts a host's last partial batch is still dropped (at
    most ``rows - 1`` examples per host): padding it would need the hosts to agree on a batch
    count, which they do not exchange.
    """
    import tensorflow as tf

    examples = _task_dataset(cfg, shuffle=False, shard_id=shard_id, num_shards=num_shards,
                             num_epochs=1)
    converted = feature_converter_cls(pack=False)(examples, dict(cfg.task_feature_lengths))
    rows_per_host = cfg.batch_size // num_shards

    def stacked(rows):
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    rows, sources = [], []
    for row, ex in tf.data.Dataset.zip((converted, examples)).as_numpy_iterator():
        rows.append(row)
        sources.append(ex)
        if len(rows) == rows_per_host:
            yield stacked(rows), sources
            rows, sources = [], []
    if rows and num_shards == 1:
        pad = {k: np.zeros_like(v) for k, v in rows[0].items()}
        yield stacked(rows + [pad] * (rows_per_host - len(rows))), sources


def first_batch(ds, cfg: DatasetConfig):
    """``(first batch, iterator over the rest)`` of ``ds``; RunError when it has no batch."""
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


def input_specs(batch, batch_size: int) -> tuple[dict, dict]:
    """The shapes (with the global ``batch_size``) and dtypes of ``batch``'s features, as
    ``model.get_initial_variables`` takes them."""
    input_shapes = {k: (batch_size, *np.shape(v)[1:]) for k, v in batch.items()}
    input_types = {k: np.asarray(v).dtype for k, v in batch.items()}
    return input_shapes, input_types


def num_target_tokens(batch) -> int:
    """The target tokens of a batch that the loss counts (nonzero weight, or not padding)."""
    w = batch.get("decoder_loss_weights")
    if w is None:
        w = batch.get("decoder_target_tokens")
    return int(np.sum(np.asarray(w) > 0))
