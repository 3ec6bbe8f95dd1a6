"""Optimizers and learning-rate schedules as T5 / T5X use them.

* ``rsqrt_schedule``: ``base_lr / sqrt(max(step, warmup_steps))`` (T5 pretraining: base 1.0, warmup
  10k, i.e. a constant 0.01 warmup plateau then inverse-square-root decay); optional linear warmup
  from 0 instead of the plateau.
* ``constant_schedule``: fine-tuning (T5: Adafactor, 1e-3 constant).
* ``make_optimizer``: Adafactor (T5X defaults: factored second moments, decay 0.8, update clipping
  1.0, parameter-scale multiplication) or AdamW (with decoupled weight decay, never applied to
  parameters of rank <= 1 such as norm scales and biases), with optional global-norm gradient
  clipping.

Scanned layers. Under ``nn.scan`` every per-layer parameter carries a leading ``layers`` axis
(logical name ``partitioning.LAYERS``): a norm scale is ``[P, d]``, a kernel ``[P, d, f]``.
``OptimizerDef.transform(param_axes)`` builds the optimizer for such a tree from the parameters'
logical axis names (``param_axes``): a leaf whose first logical axis is ``layers`` is updated
layer by layer (the per-leaf optimizer under ``jax.vmap`` over that axis), so its rank for the
weight-decay mask and Adafactor's factored second moments, update clipping and parameter scale
are those of one layer, and the update of scanned layer ``p`` equals the update of unrolled
``layers_{p}``. Gradient clipping by global norm stays over all leaves. ``OptimizerDef.tx``
treats every leaf as one parameter: it is the optimizer of trees without a layer axis.

Only the ``params`` collection is optimised; non-trainable collections (``frozen``) never reach
the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import PartitionSpec

from hypermoe_jax import partitioning as part


@gin.configurable
def rsqrt_schedule(
    base_learning_rate: float = 1.0,
    warmup_steps: int = 10_000,
    linear_warmup: bool = False,
    decay_factor: float = 1.0,
) -> optax.Schedule:
    """T5's inverse-square-root decay, ``base / sqrt(max(step, warmup))``."""
    if warmup_steps <= 0:
        raise ValueError(f"warmup_steps must be positive, got {warmup_steps}")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = base_learning_rate * decay_factor / jnp.sqrt(jnp.maximum(step, warmup_steps))
        if linear_warmup:
            lr = lr * jnp.minimum(1.0, (step + 1.0) / warmup_steps)
        return lr

    return schedule


@gin.configurable
def constant_schedule(learning_rate: float = 1e-3) -> optax.Schedule:
    return optax.constant_schedule(learning_rate)


def _decay_mask(params):
    # Under ``OptimizerDef.transform`` a layered leaf reaches this mask one layer at a time.
    return jax.tree.map(lambda p: p.ndim > 1, params)


# --------------------------------------------------------------------------------------------
# Layer-by-layer updates of scanned parameters
# --------------------------------------------------------------------------------------------


def _is_axes_leaf(x) -> bool:
    return x is None or isinstance(x, (PartitionSpec, tuple, list))


def has_layer_axis(axes) -> bool:
    """Whether a leaf with logical axis names ``axes`` (a ``PartitionSpec``, a tuple of names or
    None) has the scanned ``layers`` axis first."""
    return axes is not None and len(axes) > 0 and axes[0] == part.LAYERS


def logical_param_axes(boxed_variables) -> Any:
    """The logical axis names of every parameter (a tree of ``PartitionSpec``s; empty for unboxed
    leaves) from a model's boxed variables, e.g. ``jax.eval_shape`` of its initialiser."""
    return nn.get_partition_spec(boxed_variables)["params"]


class LayerwiseState(NamedTuple):
    """State of ``layerwise``: one state of the inner transformation per group of leaves --
    ``"unstacked"`` for the leaves without a layer axis, ``"layers_{n}"`` (state leaves with a
    leading [n] axis) for the leaves with ``n`` layers."""

    groups: dict[str, optax.OptState]


def layerwise(
    inner: optax.GradientTransformation, per_layer: Any
) -> optax.GradientTransformation:
    """``inner`` applied to the leaves of ``per_layer`` False as they are, and to the others one
    layer at a time: ``jax.vmap`` of ``inner`` over their leading axis (one vmap per layer count).

    ``per_layer``: a tree of bools with the structure of the parameters. ``inner`` must treat
    leaves independently (as Adafactor and AdamW do); a transformation that couples leaves, such
    as clipping by global norm, belongs outside (``optax.chain(clip, layerwise(...))``). Leaves
    that ``inner`` does not see are ``optax.MaskedNode()`` (as under ``optax.multi_transform``).
    """
    flag_leaves = jax.tree_util.tree_flatten_with_path(per_layer)[0]
    flags = [bool(f) for _, f in flag_leaves]
    flag_paths = [jax.tree_util.keystr(k) for k, _ in flag_leaves]

    def leaves_of(tree, what: str):
        with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
        paths = [jax.tree_util.keystr(k) for k, _ in with_path]
        if paths != flag_paths:
            missing = sorted(set(flag_paths) - set(paths))[:3]
            extra = sorted(set(paths) - set(flag_paths))[:3]
            raise ValueError(
                f"The {what} do not match the parameter axes the optimizer was built for "
                f"({len(paths)} leaves vs {len(flag_paths)}; only in the axes: {missing}, only "
                f"in the {what}: {extra}).")
        return [x for _, x in with_path], treedef

    def groups_of(leaves) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        for i, (flag, x) in enumerate(zip(flags, leaves)):
            if not flag:
                key = "unstacked"
            elif x.ndim == 0:
                raise ValueError(f"Parameter {flag_paths[i]} has a `layers` axis but is a scalar.")
            else:
                key = f"layers_{x.shape[0]}"
            groups.setdefault(key, []).append(i)
        return groups

    def masked(leaves, treedef, idx):
        keep = set(idx)
        return treedef.unflatten(
            [x if i in keep else optax.MaskedNode() for i, x in enumerate(leaves)])

    def run(key, fn, *args):
        return fn(*args) if key == "unstacked" else jax.vmap(fn)(*args)

    def init_fn(params):
        leaves, treedef = leaves_of(params, "parameters")
        return LayerwiseState({
            key: run(key, inner.init, masked(leaves, treedef, idx))
            for key, idx in groups_of(leaves).items()
        })

    def update_fn(updates, state, params=None):
        u_leaves, treedef = leaves_of(updates, "updates")
        p_leaves = None if params is None else leaves_of(params, "parameters")[0]
        groups = groups_of(u_leaves)
        if set(groups) != set(state.groups):
            raise ValueError(f"Optimizer state groups {sorted(state.groups)} do not match the "
                             f"updates' {sorted(groups)}.")
        out = list(u_leaves)
        new_state = {}
        for key, idx in groups.items():
            g_params = None if p_leaves is None else masked(p_leaves, treedef, idx)
            new_u, new_state[key] = run(key, inner.update, masked(u_leaves, treedef, idx),
                                        state.groups[key], g_params)
            new_leaves = jax.tree.leaves(new_u, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
            for i in idx:
                out[i] = new_leaves[i]
        return treedef.unflatten(out), LayerwiseState(new_state)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerDef:
    """An optax transformation and its learning-rate schedule (for logging).

    ``tx``: the optimizer of a parameter tree without a scanned layer axis (unrolled stacks);
    every leaf is one parameter. ``transform(param_axes)``: the optimizer of any tree, from the
    parameters' logical axis names (scanned stacks: layer by layer; see the module docstring).
    ``per_leaf`` is the part of ``tx`` that acts leaf by leaf, ``clip_grad_norm`` the global-norm
    clipping in front of it.
    """

    tx: optax.GradientTransformation
    learning_rate: optax.Schedule
    per_leaf: optax.GradientTransformation | None = None
    clip_grad_norm: float | None = None

    def lr_at(self, step) -> jax.Array:
        return jnp.asarray(self.learning_rate(step), jnp.float32)

    def transform(self, param_axes: Any) -> optax.GradientTransformation:
        """The optimizer of parameters with logical axis names ``param_axes``: a tree with the
        parameters' structure whose leaves are ``PartitionSpec``s / tuples of names (None or
        empty: no names), e.g. ``logical_param_axes(boxed_variables)``. Leaves whose first axis is
        ``layers`` are updated per layer; without any, the updates are ``tx``'s. The state
        (``LayerwiseState`` inside) is laid out differently from ``tx``'s: an optimizer state
        saved with one does not restore into the other."""
        if self.per_leaf is None:
            raise ValueError("This OptimizerDef has no per-leaf transformation (`per_leaf`); "
                             "build it with make_optimizer, or use `tx` for unscanned trees.")
        per_layer = jax.tree.map(has_layer_axis, param_axes, is_leaf=_is_axes_leaf)
        tx = layerwise(self.per_leaf, per_layer)
        if self.clip_grad_norm:
            tx = optax.chain(optax.clip_by_global_norm(self.clip_grad_norm), tx)
        return tx


@gin.configurable
def make_optimizer(
    name: Literal["adafactor", "adamw"] = "adafactor",
    learning_rate: optax.Schedule | float | None = None,
    weight_decay: float = 0.0,
    clip_grad_norm: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    adafactor_decay_rate: float = 0.8,
    adafactor_clipping_threshold: float | None = 1.0,
    adafactor_multiply_by_parameter_scale: bool = True,
    adafactor_min_dim_size_to_factor: int = 128,
) -> OptimizerDef:
    """Builds the optimizer (see module docstring). ``learning_rate`` defaults to T5's rsqrt."""
    if learning_rate is None:
        learning_rate = rsqrt_schedule()
    lr = learning_rate if callable(learning_rate) else optax.constant_schedule(learning_rate)
    if name == "adafactor":
        tx = optax.adafactor(
            learning_rate=lr,
            min_dim_size_to_factor=adafactor_min_dim_size_to_factor,
            decay_rate=adafactor_decay_rate,
            clipping_threshold=adafactor_clipping_threshold,
            multiply_by_parameter_scale=adafactor_multiply_by_parameter_scale,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=_decay_mask if weight_decay else None,
        )
    elif name == "adamw":
        tx = optax.adamw(
            learning_rate=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask
        )
    else:
        raise ValueError(f"Unknown optimizer {name!r}; use 'adafactor' or 'adamw'.")
    per_leaf = tx
    if clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return OptimizerDef(tx=tx, learning_rate=lr, per_leaf=per_leaf,
                        clip_grad_norm=clip_grad_norm or None)
