"""Dropless experts: every routed choice reaches its expert; tokens sorted by expert, ragged_dot.

Shapes: T_l tokens on one token shard (G_l groups of S), K choices per token, R = T_l * K rows
(one per choice), E experts (E_l on one expert shard), n expert shards, M = n * R receive rows,
d model dim, f expert hidden dim (f_l on one model shard).

``DispatchConfig(impl='dropless')`` routes with no capacity limit: capacity factors and
``min_capacity`` are unused and nothing is dropped, so the layer equals the capacity dispatches
(``einsum`` / ``gather``) whenever those drop nothing. One row per active choice is sorted by
expert, and ``jax.lax.ragged_dot`` runs each expert on its run of rows (the grouped matmul of
MaxText / megablox; on CPU XLA lowers it to a masked dense product). No ``[E, G, C, d]`` slot
buffer exists, so the cost follows the routed tokens, not the capacity.

Expert parallelism (inside ``jax.shard_map``; tokens split over (data, expert), replicated over
model, expert weights ``[E_l, d, f_l]``):

1. each device sorts its R rows by global expert, so the rows for expert shard j are one
   contiguous run; ``send_sizes[j]`` rows go to shard j;
2. the rows, their local expert id and their gate are exchanged over ``expert`` (``exchange``):

   * ``ragged_all_to_all`` (TPU, GPU): each run is sent as it is into a ``[M, d]`` receive buffer
     (offsets from an ``all_gather`` of every device's ``send_sizes``) -- volume = the routed rows;
   * ``all_to_all`` (CPU, and wherever the backend lacks the ragged collective: XLA:CPU reports
     "ragged-all-to-all is not supported"): each run is padded to R rows, ``[n, R, d]`` per device
     -- n times the ragged volume, the same receive buffer, and exact for any routing;

   the receive buffer holds M = n * R rows, the worst case (every device sends all its rows to one
   shard): dropless for any routing, at the price of memory;
3. the receiving device sorts its rows by local expert, runs ``ragged_dot`` on its E_l experts
   (its ``f_l`` slice; ``psum`` over ``model`` sums the partial outputs), applies the gate (and the
   fused companion adapters, ungated) and unsorts;
4. the outputs go back the same way (the reverse exchange), are unsorted to choice order and
   summed over the K choices of each token.

Row permutations are gathers both ways (``grouped.permute_rows``: the backward of a sort is the
inverse gather, no scatter-add).
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, PartitionSpec

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import checkpoint_names as names
from hypermoe_jax.layers import experts
from hypermoe_jax.layers.grouped import permute_rows

Array = jax.Array
Exchange = Literal["auto", "ragged_all_to_all", "all_to_all"]
EXCHANGES = ("ragged_all_to_all", "all_to_all")

# The collective of the ragged exchange (a module attribute so that tests on CPU, where XLA has no
# ragged all-to-all, can check the offsets with an emulation of its documented semantics).
_ragged_all_to_all = jax.lax.ragged_all_to_all


@struct.dataclass
class DroplessDispatch:
    """Every active choice goes to its expert (no capacity).

    Attributes:
      expert_index: <int32>[G, S, K] each choice's expert.
      gates: <float32>[G, S, K] gate weight of each choice (0 for inactive ones).
      active: <bool>[G, S, K] choice in use (not padding, rank < active k).
      num_experts: E.
      exchange: ``ragged_all_to_all`` | ``all_to_all`` (resolved, see the module docstring).
    """

    expert_index: Array
    gates: Array
    active: Array
    num_experts: int = struct.field(pytree_node=False)
    exchange: str = struct.field(pytree_node=False, default="all_to_all")


# --------------------------------------------------------------------------------------------
# Experts on rows sorted by expert
# --------------------------------------------------------------------------------------------


def _sort(keys: Array) -> tuple[Array, Array]:
    """Stable sort order of ``keys`` <int>[M] and its inverse permutation."""
    order = jnp.argsort(keys, stable=True)
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, inverse


def _ragged_adapter(adapters: dict[str, Array], xs: Array, keys: Array, sizes: Array,
                    dtype) -> Array:
    """Adapter ``keys[r]`` on row r of ``xs`` (rows sorted by key; rows past the groups give
    garbage biases, masked by the caller)."""
    a = {k: v.astype(dtype) for k, v in adapters.items()}
    safe = jnp.minimum(keys, a["b_down"].shape[0] - 1)
    h = jax.lax.ragged_dot(xs, a["w_down"], sizes)
    h = jax.nn.relu(h + a["b_down"][safe])
    return jax.lax.ragged_dot(h, a["w_up"], sizes) + a["b_up"][safe]


def expert_rows(weights, xs, keys, gates, adapters=None, *, num_experts, activation, dtype,
                dropout_rate=0.0, dropout_rng=None, model_axis=None) -> Array:
    """Gated expert outputs of rows in any order: <[M, d]> -> <[M, d]> (rows whose key is
    ``num_experts`` -- empty or inactive -- give 0).

    Args:
      weights: ``wi``/``wi_0``/``wi_1`` <[E, d, f]>, ``wo`` <[E, f, d]> (possibly local shards).
      xs: <[M, d]>; keys: <int32>[M] expert of each row in [0, E]; gates: <[M]>.
      adapters: optional companion adapters (``experts.ADAPTER_KEYS``, leading dim E), added
        ungated to each row's expert output.
      model_axis: the mesh axis ``f`` is split over (the partial outputs are summed over it).
    """
    act = experts.activation_fn(activation)
    order, inverse = _sort(keys)
    sizes = jnp.bincount(keys, length=num_experts).astype(jnp.int32)  # key E not counted
    xs = names.checkpoint_name(permute_rows(xs.astype(dtype), order, inverse),
                               names.MOE_DISPATCHED)

    def dot(lhs, name):
        return jax.lax.ragged_dot(lhs, weights[name].astype(dtype), sizes)

    if experts.is_gated(activation):
        h = act(dot(xs, "wi_0")) * dot(xs, "wi_1")
    else:
        h = act(dot(xs, "wi"))
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0)
    h = names.checkpoint_name(h, names.MOE_EXPERT_HIDDEN)
    y = dot(h, "wo")  # [M, d]; rows past sum(sizes) are 0
    if model_axis is not None:
        y = jax.lax.psum(y, model_axis)
    y = y * permute_rows(gates[:, None], order, inverse).astype(y.dtype)
    if adapters is not None:
        sorted_keys = keys[order]
        h_a = _ragged_adapter(adapters, xs, sorted_keys, sizes, dtype)
        y = y + jnp.where((sorted_keys < num_experts)[:, None], h_a, 0).astype(y.dtype)
    y = names.checkpoint_name(y, names.MOE_EXPERT_OUT)
    return permute_rows(y, inverse, order)


# --------------------------------------------------------------------------------------------
# Exchanges over the expert axis
# --------------------------------------------------------------------------------------------


def _padded_layout(send_sizes: Array, num_rows: int) -> tuple[Array, Array]:
    """The padded ``[n, R]`` send layout of rows sorted by destination: the source row of each
    layout slot (``R`` = empty) and the layout slot of each row (``n * R`` = not sent)."""
    n = send_sizes.shape[0]
    starts = jnp.cumsum(send_sizes) - send_sizes
    pos = jnp.arange(num_rows)
    src = jnp.where(pos[None] < send_sizes[:, None], starts[:, None] + pos[None], num_rows)
    dest_shard = jnp.searchsorted(jnp.cumsum(send_sizes), pos, side="right")  # [R]
    sent = dest_shard < n
    slot = jnp.where(sent, jnp.minimum(dest_shard, n - 1) * num_rows
                     + pos - starts[jnp.minimum(dest_shard, n - 1)], n * num_rows)
    return src.reshape(-1), slot


def _exchange_all_to_all(payload, send_sizes, axis):
    """Padded exchange. ``payload``: rows sorted by destination shard (``rows`` <[R, d]>,
    ``keys`` <int32>[R], ``gates`` <[R]>). Returns the receive buffers (``[n * R]`` rows, empty
    rows: key ``fill_key``, gate 0, row 0) and the function that sends ``[n * R, d]`` results
    back into the sorted ``[R, d]`` layout."""
    rows, keys, gates, fill_key = payload
    n, num_rows = send_sizes.shape[0], rows.shape[0]
    src, slot = _padded_layout(send_sizes, num_rows)

    def there(a, fill):
        a = a if a.ndim > 1 else a[:, None]
        laid = permute_rows(a, src, slot) if fill == 0 else jnp.where(
            (src < num_rows)[:, None], jnp.take(a, jnp.minimum(src, num_rows - 1), axis=0), fill)
        laid = laid.reshape(n, num_rows, *a.shape[1:])
        # all_to_all over `expert`: slice j of the padded layout goes to expert shard j; slice i
        # of the result came from shard i (each slice R rows, the routed ones first).
        out = jax.lax.all_to_all(laid, axis, split_axis=0, concat_axis=0, tiled=True)
        return out.reshape(n * num_rows, *a.shape[1:])

    buf_rows = there(rows, 0)
    buf_keys = there(keys, fill_key)[:, 0]
    buf_gates = there(gates, 0)[:, 0]

    def back(y):
        # all_to_all back: slice i of the results returns to shard i, into the padded layout.
        y = jax.lax.all_to_all(y.reshape(n, num_rows, -1), axis, split_axis=0, concat_axis=0,
                               tiled=True).reshape(n * num_rows, -1)
        return permute_rows(y, slot, src)  # [R, d] in the sorted layout; unsent rows 0

    return buf_rows, buf_keys, buf_gates, back


def _exchange_ragged(payload, send_sizes, axis):
    """Ragged exchange (``jax.lax.ragged_all_to_all``); same contract as
    ``_exchange_all_to_all``. The runs from shards 0, 1, ... land one after the other at the
    front of the ``[n * R]`` receive buffer."""
    rows, keys, gates, fill_key = payload
    n, num_rows = send_sizes.shape[0], rows.shape[0]
    me = jax.lax.axis_index(axis)
    # [n(source), n(destination)] rows each shard sends to each shard.
    sizes = jax.lax.all_gather(send_sizes, axis, tiled=False)
    starts = jnp.cumsum(send_sizes) - send_sizes  # where my run for each shard begins
    recv_sizes = sizes[:, me]  # rows I get from each shard
    recv_offsets = jnp.cumsum(recv_sizes) - recv_sizes  # where they land in my buffer
    # Where my run lands on each destination j: after the runs of the shards before me.
    out_offsets = (jnp.cumsum(sizes, axis=0) - sizes)[me]
    # Where shard i's run for me began in its sorted rows (the way back lands there).
    src_starts = (jnp.cumsum(sizes, axis=1) - sizes)[:, me]

    def there(a, fill):
        out = jnp.full((n * num_rows, *a.shape[1:]), fill, a.dtype)
        return _ragged_all_to_all(a, out, starts, send_sizes, out_offsets, recv_sizes,
                                  axis_name=axis)

    def back(y):
        out = jnp.zeros((num_rows, y.shape[-1]), y.dtype)
        return _ragged_all_to_all(y, out, recv_offsets, recv_sizes, src_starts, send_sizes,
                                  axis_name=axis)

    return there(rows, 0), there(keys, fill_key), there(gates, 0), back


_EXCHANGES = {"all_to_all": _exchange_all_to_all, "ragged_all_to_all": _exchange_ragged}


# --------------------------------------------------------------------------------------------
# The dropless expert computation
# --------------------------------------------------------------------------------------------


def _dropless_shard(x, plan: DroplessDispatch, weights, adapters, dropout_rng, *, activation,
                    dtype, dropout_rate, expert_axis=None, num_shards=1, model_axis=None,
                    rng_axes=()):
    """[G_l, S, d] -> [G_l, S, d] on one token shard (or the whole batch without a mesh)."""
    num_groups, group_size, d_model = x.shape
    num_selected = plan.expert_index.shape[-1]
    num_experts = plan.num_experts
    num_rows = num_groups * group_size * num_selected
    if dropout_rng is not None:
        for axis in rng_axes:
            dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis))
    keys = jnp.where(plan.active, plan.expert_index, num_experts).reshape(num_rows)
    gates = jnp.where(plan.active, plan.gates, 0.0).reshape(num_rows)
    # One row per choice (the backward of the repeat is a sum over the K choices).
    rows = jnp.repeat(x.reshape(-1, d_model), num_selected, axis=0)
    run = functools.partial(expert_rows, activation=activation, dtype=dtype,
                            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
                            model_axis=model_axis)
    if num_shards == 1:
        y = run(weights, rows, keys, gates, adapters, num_experts=num_experts)
    else:
        local_experts = num_experts // num_shards
        order, inverse = _sort(keys)  # rows by global expert: by destination shard
        counts = jnp.bincount(keys, length=num_experts)
        send_sizes = counts.reshape(num_shards, local_experts).sum(-1).astype(jnp.int32)
        sorted_keys = keys[order]
        local_keys = jnp.where(sorted_keys < num_experts, sorted_keys % local_experts,
                               local_experts).astype(jnp.int32)
        payload = (permute_rows(rows.astype(dtype), order, inverse), local_keys,
                   permute_rows(gates[:, None], order, inverse)[:, 0], local_experts)
        buf_rows, buf_keys, buf_gates, back = _EXCHANGES[plan.exchange](payload, send_sizes,
                                                                        expert_axis)
        y_buf = run(weights, buf_rows, buf_keys, buf_gates, adapters, num_experts=local_experts)
        y = permute_rows(back(y_buf), inverse, order)  # [R, d] in choice order
    y = y.reshape(num_groups * group_size, num_selected, d_model).sum(axis=1)
    return y.reshape(num_groups, group_size, d_model)


def run_experts(x: Array, plan: DroplessDispatch, weights: dict[str, Array], *, activation: str,
                mesh: Mesh | None = None, adapters: dict[str, Array] | None = None,
                dropout_rate: float = 0.0, dropout_rng: Array | None = None,
                dtype: jnp.dtype = jnp.float32) -> Array:
    """The experts' gated output of every token, dropless: [G, S, d] -> [G, S, d].

    Same contract as ``dispatch.run_experts``. On a mesh the token groups are split over
    (data, expert) and replicated over model (the expert hidden dim is split there).
    """
    fn = functools.partial(_dropless_shard, activation=activation, dtype=dtype,
                           dropout_rate=dropout_rate if dropout_rng is not None else 0.0)
    if mesh is None:
        return fn(x, plan, weights, adapters, dropout_rng)
    num_shards = mesh.shape[part.EXPERT]
    if plan.num_experts % num_shards:
        raise ValueError(f"num_experts={plan.num_experts} is not divisible by the mesh's expert "
                         f"axis ({num_shards}).")
    tokens = PartitionSpec(part.TOKEN_SHARDS)
    w_specs = {n: part.logical_to_mesh_spec(axes)
               for n, axes in experts.expert_weight_specs(weights).items()}
    a_specs = None if adapters is None else {n: PartitionSpec(part.EXPERT) for n in adapters}
    sharded = jax.shard_map(
        functools.partial(fn, expert_axis=part.EXPERT, num_shards=num_shards,
                          # f is split over `model` (the psum also types the output as
                          # replicated there, as out_specs says, when the axis has size 1).
                          model_axis=part.MODEL,
                          rng_axes=part.MESH_AXES),
        mesh=mesh,
        in_specs=(tokens, jax.tree.map(lambda _: tokens, plan), w_specs, a_specs,
                  None if dropout_rng is None else PartitionSpec()),
        out_specs=tokens,
    )
    return sharded(x, plan, weights, adapters, dropout_rng)
