"""Mesh construction and the logical axis rules table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

from hypermoe_jax import partitioning as part


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ((-1, 1, 1), (8, 1, 1)),
        ((2, -1, 1), (2, 4, 1)),
        ((1, 8, 1), (1, 8, 1)),
        ((2, 2, -1), (2, 2, 2)),
        ((-1, 2, 2), (2, 2, 2)),
    ],
)
def test_make_mesh_sizes(sizes, expected):
    mesh = part.make_mesh(*sizes)
    assert mesh.axis_names == part.MESH_AXES
    assert tuple(mesh.shape[a] for a in part.MESH_AXES) == expected
    assert all(t == AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_subset_of_devices():
    mesh = part.make_mesh(2, 2, 1, devices=jax.devices()[:4])
    assert mesh.devices.size == 4


@pytest.mark.parametrize(
    "sizes, match",
    [
        ((-1, -1, 1), "At most one mesh axis size may be -1"),
        ((0, 1, 1), "Mesh axis 'data' has invalid size 0"),
        ((2, -2, 1), "Mesh axis 'expert' has invalid size -2"),
        ((3, -1, 1), "8 devices cannot be split .* not divisible by 3"),
        ((2, 2, 1), "needs 4 devices but 8 are available"),
        ((4, 4, 1), "needs 16 devices but 8 are available"),
    ],
)
def test_make_mesh_bad_sizes(sizes, match):
    with pytest.raises(ValueError, match=match):
        part.make_mesh(*sizes)


def test_one_rule_per_logical_name():
    names = [name for name, _ in part.AXIS_RULES]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match=r"more than one rule: \['embed'\]"):
        part._check_rules(part.AXIS_RULES + ((part.EMBED, part.MODEL),))


def test_logical_to_mesh_spec():
    spec = part.logical_to_mesh_spec
    assert spec((part.EXPERTS, part.EMBED, part.EXPERT_MLP)) == PartitionSpec(
        part.EXPERT, None, part.MODEL
    )
    assert spec((part.EXPERT_GROUP, part.LENGTH, part.EMBED)) == PartitionSpec(
        part.TOKEN_SHARDS, None, None
    )
    assert spec((part.BATCH, part.LENGTH, part.EMBED)) == PartitionSpec(
        part.TOKEN_SHARDS, None, None
    )
    assert spec((part.EMBED, part.VOCAB)) == PartitionSpec(None, part.MODEL)


def test_mesh_axis_size():
    mesh = part.make_mesh(2, 2, 2)
    assert part.mesh_axis_size(None, part.EXPERT) == 1
    assert part.mesh_axis_size(mesh, part.EXPERT) == 2
    assert part.mesh_axis_size(mesh, part.TOKEN_SHARDS) == 4
    assert part.mesh_axis_size(mesh, part.MESH_AXES) == 8


def test_with_logical_constraint():
    x = jnp.ones((8, 4, 2))
    axes = (part.EXPERT_GROUP, part.LENGTH, part.EMBED)
    # Concrete arrays: nothing to steer, returned as is (also outside any rules context).
    assert part.with_logical_constraint(x, axes) is x
    mesh = part.make_mesh(2, 4, 1)
    with part.axis_rules(mesh):
        y = jax.jit(lambda x: part.with_logical_constraint(x * 2, axes))(x)
    assert y.sharding.spec[0] == part.TOKEN_SHARDS
    assert {s.data.shape for s in y.addressable_shards} == {(1, 4, 2)}
    np.testing.assert_array_equal(y, 2.0)


def test_logical_sharding():
    mesh = part.make_mesh(2, 4, 1)
    s = part.logical_sharding(mesh, (part.EXPERTS, part.EMBED, part.EXPERT_MLP))
    assert s.mesh.shape == mesh.shape
    assert s.spec == PartitionSpec(part.EXPERT, None, part.MODEL)
