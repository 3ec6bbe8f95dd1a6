"""The train state and how it is laid out on the device mesh.

``TrainState`` is what a checkpoint holds; ``make_mesh`` builds a run's (data, expert, model)
mesh from ``MESH_SHAPE``; ``Initializer`` builds the model's variables directly in their
``NamedSharding``s (the logical axis rules of ``partitioning``); ``to_global`` turns each host's
part of a batch into one global array, split over the data and expert axes, and ``to_local``
back (this host's rows of a model output).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from hypermoe_jax import partitioning as part
from hypermoe_jax.training.errors import RunError

Array = jax.Array


@struct.dataclass
class TrainState:
    step: Array
    params: Any
    opt_state: Any
    flax_mutables: Any  # non-trainable collections (e.g. ``frozen``); saved, never optimised
    rng: Array


def make_mesh(mesh_shape: Sequence[int], model) -> jax.sharding.Mesh:
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


def split_variables(variables) -> tuple[Any, dict]:
    """``(params, other collections)`` of a model's variables."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


class Initializer:
    """Builds sharded initial variables on the mesh."""

    def __init__(self, model, mesh, input_shapes, input_types):
        self.model, self.mesh = model, mesh
        self.input_shapes, self.input_types = input_shapes, input_types
        self._boxed = None

    def _init(self, rng):
        return self.model.get_initial_variables(rng, self.input_shapes, self.input_types)

    def boxed_abstract_variables(self):
        """Shapes of the variables with their logical axis metadata (nothing is allocated;
        traced once, then kept)."""
        if self._boxed is None:
            with part.axis_rules(self.mesh):
                self._boxed = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        return self._boxed

    def shardings(self):
        return part.params_shardings(self.mesh, self.boxed_abstract_variables())

    def abstract_variables(self):
        """The variables' shapes, dtypes and shardings (``ShapeDtypeStruct``s); nothing is
        allocated. Call under ``part.axis_rules(mesh)``."""
        abstract = jax.eval_shape(lambda: nn.unbox(self._init(jax.random.PRNGKey(0))))
        shardings = self.shardings()
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )

    def __call__(self, rng):
        shardings = self.shardings()
        with part.axis_rules(self.mesh):
            return jax.jit(lambda r: nn.unbox(self._init(r)), out_shardings=shardings)(rng)


def abstract(tree):
    """``tree`` as ``ShapeDtypeStruct``s with the leaves' shardings (a restore target)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def batch_sharding(mesh) -> NamedSharding:
    """Examples split over the data and expert axes (``part.TOKEN_SHARDS``)."""
    return NamedSharding(mesh, PartitionSpec(part.TOKEN_SHARDS))


def to_global(batch: Mapping[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """One host's part of a batch -> global arrays of the whole batch on the mesh."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in batch.items()
    }


def to_local(x: jax.Array, mesh) -> np.ndarray:
    """This host's rows of a global array split like a batch (the inverse of ``to_global``)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    x = jax.jit(lambda a: a, out_shardings=batch_sharding(mesh))(x)
    return np.asarray(multihost_utils.global_array_to_host_local_array(
        x, mesh, PartitionSpec(part.TOKEN_SHARDS)))
