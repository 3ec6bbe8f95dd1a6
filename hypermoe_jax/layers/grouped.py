"""Grouped adapter matmul: token t gets bottleneck adapter ``ids[t]`` out of M, exactly.

``grouped_adapter_mlp`` computes ``relu(x W_down[i] + b_down[i]) W_up[i] + b_up[i]`` for
``i = ids[t]`` without ever building per-token weights. Implementations (``GROUPED_IMPLS``; the
default by backend is in ``backend.DEFAULTS``):

* ``blocked``    -- tokens sorted by adapter into per-adapter rows, batched matmuls; the layout
  (``[M, cap, d]`` capacity layouts, smallest first, else an exact blocked layout) is chosen at run
  time from the largest adapter's token count (``lax.switch`` under a hand-written VJP). Tuned for
  CPU, where it is 4-10x faster than the others at M in {8, 64};
* ``ragged_dot`` -- sort + ``jax.lax.ragged_dot``: the native grouped matmul on TPU / GPU;
* ``onehot``     -- every adapter on every token, masked (fine for small M).

Shapes: T tokens, M adapters, d model dim, b bottleneck.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from hypermoe_jax.layers import backend

Array = jax.Array
GroupedImpl = Literal["auto", "blocked", "ragged_dot", "onehot"]
GROUPED_IMPLS = ("blocked", "ragged_dot", "onehot")
# Capacity layouts the blocked grouped matmul tries, smallest first (``grouped_adapter_mlp``):
# the padding costs (f - 1) of the ideal rows, so the tightest layout that fits is taken.
DEFAULT_GROUPED_CAPACITY_FACTORS = (1.25, 1.5, 2.0)


def _block_rows(num_tokens: int, num_groups: int, block_size: int) -> int:
    """Rows per block: the block size, or less when the average group is much smaller."""
    avg = max(1, -(-num_tokens // num_groups))
    return max(8, min(block_size, 1 << (avg - 1).bit_length()))


@jax.custom_vjp
def permute_rows(x: Array, index: Array, inverse: Array) -> Array:
    """``x[index]`` (rows with an out-of-range index are 0) for an index that is injective on its
    valid entries; ``inverse`` is its inverse (``index[inverse[i]] == i`` for every row i of x that
    ``index`` takes; out of range for a row it never takes, whose gradient is then 0).

    The transpose of such a gather is the gather by ``inverse``: no scatter-add in the backward.
    """
    return jnp.take(x, index, axis=0, mode="fill", fill_value=0)


def _permute_rows_fwd(x, index, inverse):
    return permute_rows(x, index, inverse), (index, inverse)


def _permute_rows_bwd(res, g):
    index, inverse = res
    return jnp.take(g, inverse, axis=0, mode="fill", fill_value=0), None, None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def _adapter_mlp_batched(a: dict[str, Array], xb: Array, precision) -> Array:
    """Adapter n on rows ``xb[n]``: <[n, s, d]> with adapters <[n, ...]> -> <[n, s, d]>."""
    h = jnp.einsum("nsd,ndb->nsb", xb, a["w_down"], precision=precision)
    h = jax.nn.relu(h + a["b_down"][:, None, :])
    return jnp.einsum("nsb,nbd->nsd", h, a["w_up"], precision=precision) + a["b_up"][:, None, :]


def _capacities(factors, num_tokens: int, num_adapters: int) -> list[int]:
    """Rows per adapter of the capacity layouts, ascending: ``ceil(f * T / M)`` rounded up to 8,
    at most T (a layout that no histogram can overflow ends the list)."""
    if factors is None:
        return []
    if isinstance(factors, (int, float)):
        factors = (factors,)
    caps = []
    for f in sorted(float(v) for v in factors):
        if f <= 0:
            raise ValueError(f"grouped capacity factors must be > 0, got {tuple(factors)}")
        cap = -(-int(math.ceil(f * num_tokens / num_adapters)) // 8) * 8
        cap = min(cap, -(-num_tokens // 8) * 8)
        if not caps or cap > caps[-1]:
            caps.append(cap)
        if cap >= num_tokens:
            break
    return caps


def _sort_by_adapter(ids: Array, num_adapters: int) -> dict[str, Array]:
    """Integer bookkeeping of the sorted layouts: tokens per adapter, where each adapter's run
    starts, the sorted order and each token's position within its adapter's run."""
    num_tokens = ids.shape[0]
    counts = jnp.bincount(ids, length=num_adapters)  # [M]
    start = jnp.cumsum(counts) - counts
    order = jnp.argsort(ids, stable=True)  # sorted position -> token
    rank = jnp.zeros_like(ids).at[order].set(jnp.arange(num_tokens, dtype=ids.dtype))
    return {"ids": ids, "counts": counts, "start": start, "order": order,
            "within": rank - start[ids]}


def _layout_rows(idx, row_adapter, row_offset, token_row):
    """Source token of each layout row (T = empty row) and the inverse map (token -> row)."""
    num_tokens = idx["ids"].shape[0]
    valid = row_offset < idx["counts"][row_adapter]
    src = idx["order"][jnp.clip(idx["start"][row_adapter] + row_offset, 0, num_tokens - 1)]
    return jnp.where(valid, src, num_tokens), token_row


def _capacity_layout(cap, precision, adapters, x, idx):
    """``[M, cap, d]``: adapter m's tokens in rows ``m * cap + i`` (needs every count <= cap)."""
    num_adapters = adapters["w_down"].shape[0]
    rows = jnp.arange(num_adapters * cap)
    src, dest = _layout_rows(idx, rows // cap, rows % cap, idx["ids"] * cap + idx["within"])
    xb = permute_rows(x, src, dest).reshape(num_adapters, cap, x.shape[-1])
    y = _adapter_mlp_batched(adapters, xb, precision).reshape(num_adapters * cap, x.shape[-1])
    return permute_rows(y, dest, src)  # [T, d] in token order


def _blocked_layout(blk, num_blocks, precision, adapters, x, idx):
    """Each adapter's run padded to whole blocks of ``blk`` rows (exact for any histogram)."""
    num_adapters = adapters["w_down"].shape[0]
    padded = (idx["counts"] + blk - 1) // blk * blk
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    block_adapter = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * blk, side="right")
    block_adapter = jnp.minimum(block_adapter, num_adapters - 1)  # [P / blk]
    row_adapter = jnp.repeat(block_adapter, blk, total_repeat_length=num_blocks * blk)
    offset = jnp.arange(num_blocks * blk) - padded_start[row_adapter]
    src, dest = _layout_rows(idx, row_adapter, offset,
                             padded_start[idx["ids"]] + idx["within"])
    xb = permute_rows(x, src, dest).reshape(num_blocks, blk, x.shape[-1])
    a = {k: v[block_adapter] for k, v in adapters.items()}
    y = _adapter_mlp_batched(a, xb, precision).reshape(num_blocks * blk, x.shape[-1])
    return permute_rows(y, dest, src)


def mask_and_add(out: Array, residual: Array | None, token_mask: Array | None) -> Array:
    """``residual + out`` with ``out`` zeroed where the token mask <bool>[...] is False."""
    if token_mask is not None:
        out = jnp.where(token_mask[..., None], out, jnp.zeros((), out.dtype))
    if residual is not None:
        out = residual + out.astype(residual.dtype)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _switch_layouts(layouts, index, adapters, x, idx, residual, token_mask):
    """``residual + mask * layouts[index](adapters, x, idx)``, the add and mask fused into the
    branch. Differentiated by hand: ``jax.lax.switch``'s own linearisation would make the forward
    return every branch's residuals (zeros for the branches not taken) -- for these layouts
    several ``[rows, d]`` buffers per step; here the backward re-runs the taken branch's cheap
    part (the row gather and the down projection) under ``jax.vjp`` instead."""
    branches = [
        lambda a, x, i, r, m, f=f: mask_and_add(f(a, x, i), r, m) for f in layouts
    ]
    return jax.lax.switch(index, branches, adapters, x, idx, residual, token_mask)


def _switch_layouts_fwd(layouts, index, adapters, x, idx, residual, token_mask):
    out = _switch_layouts(layouts, index, adapters, x, idx, residual, token_mask)
    return out, (index, adapters, x, idx, residual is not None, token_mask)


def _switch_layouts_bwd(layouts, res, g):
    index, adapters, x, idx, has_residual, token_mask = res
    g_out = mask_and_add(g.astype(x.dtype), None, token_mask)

    def branch(f):
        def vjp(a, x, i, gy):
            return jax.vjp(lambda a, x: f(a, x, i), a, x)[1](gy)
        return vjp

    d_adapters, d_x = jax.lax.switch(index, [branch(f) for f in layouts], adapters, x, idx,
                                     g_out)
    return None, d_adapters, d_x, None, g if has_residual else None, None


_switch_layouts.defvjp(_switch_layouts_fwd, _switch_layouts_bwd)


def _grouped_sorted(adapters, x, ids, block_size, capacity_factor, dtype, precision,
                    residual=None, token_mask=None):
    """Tokens sorted by adapter, laid out in per-adapter rows, batched matmuls. Two layouts:

    * capacity (the fast path, taken when every adapter has at most ``cap`` tokens,
      ``cap = ceil(f * T / M)`` for the smallest factor f of ``capacity_factor`` that fits):
      ``[M, cap, d]``, one matmul per adapter with its own weights -- ``M * cap * 2 d b`` MACs;
    * blocked (exact for any histogram): each adapter's run padded to whole blocks of ``blk``
      rows, ``P = floor((T + M (blk - 1)) / blk) * blk`` rows in all (the worst case), one matmul
      per block with its adapter's weights (per-block weights ``[P / blk, d, b]`` are gathered) --
      at most ``1 + M blk / T`` times the ideal ``T * 2 d b`` MACs.

    ``jax.lax.switch`` picks the layout at run time from the largest adapter's token count; all
    give the same result. Rows move by two permutations (gathers both ways: the backward of each is
    the inverse gather). Per-token weights are never built. ``residual`` (added to the output) and
    ``token_mask`` (tokens where it is False get 0) are applied inside the branch, where they fuse
    with the last permutation instead of costing a pass of their own over ``[T, d]``.
    """
    num_tokens = x.shape[0]
    num_adapters = adapters["w_down"].shape[0]
    x = x.astype(dtype)
    adapters = {k: v.astype(dtype) for k, v in adapters.items()}
    idx = _sort_by_adapter(ids, num_adapters)

    blk = _block_rows(num_tokens, num_adapters, block_size)
    num_blocks = (num_tokens + num_adapters * (blk - 1)) // blk
    caps = _capacities(capacity_factor, num_tokens, num_adapters)
    layouts = tuple(functools.partial(_capacity_layout, c, precision) for c in caps)
    if not caps or caps[-1] < num_tokens:  # the capacity layouts can overflow: blocked last
        layouts += (functools.partial(_blocked_layout, blk, num_blocks, precision),)
    if len(layouts) == 1:
        return mask_and_add(layouts[0](adapters, x, idx), residual, token_mask)
    largest = jnp.max(idx["counts"])
    index = jnp.sum(largest > jnp.asarray(caps[: len(layouts) - 1], largest.dtype))
    return _switch_layouts(layouts, index, adapters, x, idx, residual, token_mask)


def _grouped_ragged_dot(adapters, x, ids, dtype, precision):
    """Sort tokens by adapter and use ``jax.lax.ragged_dot`` (native grouped matmul on TPU / GPU;
    on CPU it lowers to a masked dense product costing M times the ideal)."""
    num_adapters = adapters["w_down"].shape[0]
    a = {k: v.astype(dtype) for k, v in adapters.items()}
    order = jnp.argsort(ids, stable=True)
    sorted_ids = ids[order]
    sizes = jnp.bincount(ids, length=num_adapters).astype(jnp.int32)
    xs = x.astype(dtype)[order]
    h = jax.lax.ragged_dot(xs, a["w_down"], sizes, precision=precision)
    h = jax.nn.relu(h + a["b_down"][sorted_ids])
    y = jax.lax.ragged_dot(h, a["w_up"], sizes, precision=precision) + a["b_up"][sorted_ids]
    return jnp.zeros_like(y).at[order].set(y)


def _grouped_onehot(adapters, x, ids, dtype, precision):
    """Every adapter on every token, masked: ``M * T * 2 d b`` MACs (fine for small M)."""
    num_adapters = adapters["w_down"].shape[0]
    a = {k: v.astype(dtype) for k, v in adapters.items()}
    onehot = jax.nn.one_hot(ids, num_adapters, dtype=dtype)  # [T, M]
    h = jnp.einsum("td,mdb->tmb", x.astype(dtype), a["w_down"], precision=precision)
    h = jax.nn.relu(h + a["b_down"]) * onehot[..., None]
    y = jnp.einsum("tmb,mbd->td", h, a["w_up"], precision=precision)
    return y + onehot @ a["b_up"]


def grouped_adapter_mlp(
    adapters: dict[str, Array],
    x: Array,
    ids: Array,
    *,
    impl: GroupedImpl = "auto",
    block_size: int = 128,
    capacity_factor: float | Sequence[float] | None = DEFAULT_GROUPED_CAPACITY_FACTORS,
    dtype: jnp.dtype = jnp.float32,
    precision: jax.lax.PrecisionLike = None,
    residual: Array | None = None,
    token_mask: Array | None = None,
) -> Array:
    """Token t gets adapter ``ids[t]``: ``relu(x W_down[i] + b_down[i]) W_up[i] + b_up[i]``.

    Args:
      adapters: ``experts.ADAPTER_KEYS`` with leading dim M.
      x: <[T, d]>.
      ids: <int32>[T] in [0, M).
      impl: ``blocked`` (sort + per-adapter batched matmuls, ``_grouped_sorted``; the fastest on
        CPU by 4-10x at M in {8, 64}, see ``benchmarks/hyper_layer.py``), ``ragged_dot`` (sort +
        ``jax.lax.ragged_dot``: the native grouped matmul on TPU / GPU; on CPU a masked dense
        product costing M times the ideal), ``onehot`` (all M adapters, masked) or ``auto``
        (by backend, ``backend.DEFAULTS['grouped_matmul']``).
      block_size: rows per block of the exact blocked layout.
      capacity_factor: ``blocked`` takes a faster ``[M, cap, d]`` layout whenever every adapter
        has at most ``cap = f * T / M`` tokens, for the smallest factor f of this float or
        sequence that fits (checked at run time; None: never).
      residual: optional <[T, d]> added to the output (fused with the last permutation).
      token_mask: optional <bool>[T]; tokens where it is False get 0 (before ``residual``).

    Returns:
      <[T, d]>.
    """
    backend.check("grouped_matmul", impl, GROUPED_IMPLS, "grouped_adapter_mlp impl")
    impl = backend.resolve("grouped_matmul", impl)
    ids = ids.astype(jnp.int32)
    if impl == "blocked":
        return _grouped_sorted(adapters, x, ids, block_size, capacity_factor, dtype, precision,
                               residual, token_mask)
    if impl == "ragged_dot":
        out = _grouped_ragged_dot(adapters, x, ids, dtype, precision)
    else:
        out = _grouped_onehot(adapters, x, ids, dtype, precision)
    return mask_and_add(out, residual, token_mask)


