"""``ExpertPartitioner``: T5X's MoE partitioner for this project's models.

T5X's ``MoePjitPartitioner`` (``t5x.contrib.moe``) has the (data, expert, model) mesh our MoE
layers shard over, but three things keep them from running expert-parallel under it:

* T5X enters its mesh with the legacy ``with mesh:`` context, which does not set the abstract
  mesh that the MoE layers read (``jax.sharding.get_abstract_mesh``): they would see no mesh and
  never enter ``shard_map``. Partitioned functions here also run under ``jax.set_mesh``.
* On CPU, T5X's mesh puts every local device on ``model``; here the mesh is built as this
  project's trainer builds it: ``expert`` = ``num_expert_partitions``, ``model`` =
  ``num_partitions``, ``data`` = the rest (so 8 host devices give an expert axis of 4 or 8).
  On GPU and TPU, T5X's topology-aware mesh is kept.
* Its logical axis rules are flaxformer's; here they are ``hypermoe_jax.partitioning.AXIS_RULES``
  (batch and token groups over (data, expert), experts over ``expert``), and the batch is laid
  out over (``data``, ``expert``) in that order, as the MoE layers split their token groups.
  The factored Adafactor second moments of expert weights keep the ``expert`` axis of their
  parameter wherever it is (T5X prepends it, which is wrong for scanned layers).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import logging
from flax import core as flax_core
from flax import traverse_util
from jax.experimental.pjit import pjit
from jax.sharding import Mesh, PartitionSpec
from t5x import adafactor
from t5x import partitioning as t5x_partitioning
from t5x import train_state as train_state_lib
from t5x.contrib.moe import partitioning as moe_partitioning

from hypermoe_jax import partitioning as part


class _PjittedFnWithMesh(t5x_partitioning.PjittedFnWithContext):
    """T5X's partitioned callable, also run under ``jax.set_mesh`` (the abstract mesh)."""

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return super().__call__(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self._mesh):
            return super().lower(*args, **kwargs)


def standard_logical_axis_rules() -> list[tuple[str, Any]]:
    """This project's logical axis rules, in T5X's list form."""
    return [(name, axis) for name, axis in part.AXIS_RULES]


class ExpertPartitioner(moe_partitioning.MoePjitPartitioner):
    """T5X partitioner with an ``expert`` mesh axis for this project's MoE layers.

    Args:
      num_expert_partitions: size of the ``expert`` mesh axis (T5X: an upper bound -- the
        largest size <= it that divides the data-parallel devices is used, with a warning when
        it is smaller). Must divide every MoE layer's number of experts.
      num_partitions: size of the ``model`` mesh axis (tensor parallelism).
      model_parallel_submesh, params_on_devices: as T5X's partitioner.
      logical_axis_rules: default ``standard_logical_axis_rules()``.
    """

    def __init__(self, num_expert_partitions: int = 1, num_partitions: int | None = 1,
                 model_parallel_submesh=None, params_on_devices: bool = True,
                 logical_axis_rules: Sequence[tuple[str, Any]] | None = None):
        if num_expert_partitions < 1:
            raise ValueError(
                f"num_expert_partitions must be >= 1, got {num_expert_partitions}.")
        super().__init__(
            num_expert_partitions=num_expert_partitions,
            num_partitions=num_partitions,
            model_parallel_submesh=model_parallel_submesh,
            params_on_devices=params_on_devices,
            logical_axis_rules=(standard_logical_axis_rules() if logical_axis_rules is None
                                else logical_axis_rules),
        )

    # -- mesh -------------------------------------------------------------------------------

    @property
    def mesh(self) -> Mesh:
        if "_hm_mesh" not in self.__dict__:
            self.__dict__["_hm_mesh"] = self._build_mesh()
        return self.__dict__["_hm_mesh"]

    def _build_mesh(self) -> Mesh:
        if jax.devices(self._backend)[0].platform != "cpu":
            return moe_partitioning.default_moe_mesh(
                self._num_expert_partitions, self._num_partitions,
                self._model_parallel_submesh, self._backend)
        devices = jax.devices(self._backend)
        model = self._num_partitions or 1
        if len(devices) % model:
            raise ValueError(
                f"num_partitions={model} does not divide the {len(devices)} devices; pick a "
                "divisor of the device count.")
        expert = self._num_expert_partitions
        while (len(devices) // model) % expert:
            expert -= 1
        if expert != self._num_expert_partitions:
            logging.warning(
                "ExpertPartitioner: %d devices (model axis %d) cannot hold an expert axis of "
                "%d; using %d.", len(devices), model, self._num_expert_partitions, expert)
        return part.make_mesh(data=-1, expert=expert, model=model, devices=devices)

    # -- data layout: the batch over (data, expert) -----------------------------------------

    @property
    def data_partition_spec(self) -> PartitionSpec:
        return PartitionSpec(part.TOKEN_SHARDS)

    def get_data_layout(self, batch_size=None, host_index=None):
        if host_index is not None:
            raise NotImplementedError("Explicit host_index is not supported.")
        chunker = self._local_chunker
        n_data = chunker.global_mesh.shape[part.DATA]
        n_expert = chunker.global_mesh.shape[part.EXPERT]
        batch_size = batch_size or n_data * n_expert
        if batch_size % (n_data * n_expert):
            raise ValueError(
                f"Batch size {batch_size} must be divisible by the data-parallel devices "
                f"(data {n_data} x expert {n_expert} = {n_data * n_expert}): the batch is "
                "split over both axes.")
        num_shards = chunker.num_chunks[part.DATA] * chunker.num_chunks[part.EXPERT]
        replica_id = chunker.get_local_chunk_info(
            (n_data, batch_size // n_data), (part.DATA, part.EXPERT)).replica_id
        return t5x_partitioning.DataLayout(
            batch_size=batch_size,
            shard_id=(chunker.chunk_ids[part.DATA] * chunker.num_chunks[part.EXPERT]
                      + chunker.chunk_ids[part.EXPERT]),
            num_shards=num_shards,
            is_first_host_in_replica_set=(replica_id == 0),
        )

    # -- optimizer state axes ---------------------------------------------------------------

    def get_logical_axes(self, train_state):
        logical_axes = train_state.as_logical_axes()
        if isinstance(logical_axes, train_state_lib.InferenceState):
            return logical_axes
        opt_def = train_state._optimizer.optimizer_def  # noqa: SLF001 (T5X's layout)
        factor_map = getattr(getattr(opt_def, "hyper_params", None), "factor_map", None)
        if not isinstance(opt_def, adafactor.Adafactor) or not factor_map:
            return logical_axes
        param_axes = traverse_util.flatten_dict(
            flax_core.unfreeze(logical_axes.params), sep="/")
        state = flax_core.unfreeze(logical_axes._optimizer.state_dict())  # noqa: SLF001
        param_states = traverse_util.flatten_dict(state["state"]["param_states"], sep="/")
        for path, axes in param_axes.items():
            rule = factor_map.get(path)
            if axes is None or rule is None or part.EXPERTS not in tuple(axes):
                continue
            names = tuple(axes)
            rule = tuple(adafactor.factor_name_to_factordim(r) for r in rule)
            row = [i for i, r in enumerate(rule) if r == adafactor.FactorDim.ROW]
            col = [i for i, r in enumerate(rule) if r == adafactor.FactorDim.COLUMN]
            if not row or not col:
                continue
            for key, dropped in (("v_row", col), ("v_col", row)):
                kept = [n if n == part.EXPERTS else None
                        for i, n in enumerate(names) if i not in dropped]
                param_states[f"{path}/{key}"] = PartitionSpec(*kept)
        state["state"]["param_states"] = traverse_util.unflatten_dict(
            param_states, sep="/")
        if logical_axes.flax_mutables:
            state["flax_mutables"] = logical_axes.flax_mutables
        return train_state.restore_state(state)

    # -- partitioned functions --------------------------------------------------------------

    def partition(self, fn: Callable, in_axis_resources, out_axis_resources,
                  static_argnums=(), donate_argnums=()):
        # T5X's MoE partitioner rewrites raw PartitionSpec('data') to ('expert', 'data');
        # the batch here is laid out over ('data', 'expert').
        def data_spec(spec):
            return self.data_partition_spec if spec == PartitionSpec("data") else spec

        def rewrite(resources):
            if isinstance(resources, PartitionSpec):
                return data_spec(resources)
            if isinstance(resources, (list, tuple)):
                return type(resources)(data_spec(r) for r in resources)
            return resources

        pjitted = pjit(
            fn,
            in_shardings=rewrite(in_axis_resources),
            out_shardings=rewrite(out_axis_resources),
            static_argnums=static_argnums,
            donate_argnums=donate_argnums,
        )
        return _PjittedFnWithMesh(pjitted, self.mesh, self._logical_axis_rules)

