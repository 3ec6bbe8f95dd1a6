"""Device mesh and the one logical-axis rules table used by every module.

The mesh has three axes:

* ``data``   -- data parallelism (batch / token groups are split over it);
* ``expert`` -- expert parallelism (experts are split over it; tokens are also split over it
  outside the expert computation, so an expert shard is a data shard too);
* ``model``  -- tensor parallelism (expert / MLP hidden dim, attention heads, vocab).

Every parameter and activation carries logical axis names (the constants below); ``AXIS_RULES``
maps each logical name to at most one mesh axis (or a tuple of them) -- exactly one rule per name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# Mesh axis names.
DATA = "data"
EXPERT = "expert"
MODEL = "model"
MESH_AXES = (DATA, EXPERT, MODEL)
# Tokens (and token groups) are split over both the data and the expert axis.
TOKEN_SHARDS = (DATA, EXPERT)

# Logical axis names, shared by every module (never spell them as literals elsewhere).
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV = "kv"
VOCAB = "vocab"
LAYERS = "layers"
EXPERTS = "expert"  # the expert dimension of weights and of dispatched activations
EXPERT_GROUP = "expert_group"  # the token-group dimension of [G, S, ...] activations
EXPERT_MLP = "expert_mlp"  # the hidden dim of expert MLPs
UNMODELED = "unmodeled"  # small dims never sharded (router outputs, hyper dims, capacity)
HYPER = "hyper"  # hypernetwork / embedding dims
RELPOS_BUCKETS = "relpos_buckets"

AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    (BATCH, TOKEN_SHARDS),
    (EXPERT_GROUP, TOKEN_SHARDS),
    (EXPERTS, EXPERT),
    (EXPERT_MLP, MODEL),
    (MLP, MODEL),
    (HEADS, MODEL),
    (VOCAB, MODEL),
    (LENGTH, None),
    (EMBED, None),
    (KV, None),
    (LAYERS, None),
    (UNMODELED, None),
    (HYPER, None),
    (RELPOS_BUCKETS, None),
)


def _check_rules(rules: Sequence[tuple[str, object]]) -> None:
    names = [name for name, _ in rules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"Logical axis names with more than one rule: {dupes}")


_check_rules(AXIS_RULES)


def make_mesh(
    data: int = -1,
    expert: int = 1,
    model: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a (data, expert, model) mesh with Auto axis types.

    Exactly one of the sizes may be -1, meaning "all remaining devices".
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, expert, model]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis size may be -1, got {dict(zip(MESH_AXES, sizes))}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"Mesh axis {name!r} has invalid size {s}; use a positive size or -1.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"{n} devices cannot be split into a mesh with fixed sizes "
                f"{dict(zip(MESH_AXES, sizes))}: {n} is not divisible by {known}."
            )
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(
            f"Mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but "
            f"{n} are available; make data*expert*model equal the device count (or pass -1)."
        )
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_axis_size(mesh: Mesh | None, axis: str | Sequence[str]) -> int:
    """Size of one mesh axis (or the product of several); 1 without a mesh."""
    if mesh is None:
        return 1
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_mesh_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec with ``AXIS_RULES``."""
    return nn.logical_to_mesh_axes(tuple(logical_axes), AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh_spec(logical_axes))


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh / rules context and on
    concrete (eagerly computed) arrays, where a constraint has nothing to steer."""
    if not isinstance(x, jax.core.Tracer):
        return x
    return nn.with_logical_constraint(x, tuple(logical_axes))


@contextlib.contextmanager
def axis_rules(mesh: Mesh | None = None):
    """Context that activates ``AXIS_RULES`` (and the mesh, if given) for Linen modules."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.logical_axis_rules(AXIS_RULES))
        if mesh is not None:
            stack.enter_context(jax.set_mesh(mesh))
        yield


def params_shardings(mesh: Mesh, abstract_variables) -> object:
    """NamedShardings for a (boxed) variable tree, from its logical partitioning metadata."""
    logical_specs = nn.get_partition_spec(abstract_variables)
    return nn.logical_to_mesh_sharding(logical_specs, mesh, AXIS_RULES)
