"""Optimizers and learning-rate schedules as T5 / T5X use them.

* ``rsqrt_schedule``: ``base_lr / sqrt(max(step, warmup_steps))`` (T5 pretraining: base 1.0, warmup
  10k, i.e. a constant 0.01 warmup plateau then inverse-square-root decay); optional linear warmup
  from 0 instead of the plateau.
* ``constant_schedule``: fine-tuning (T5: Adafactor, 1e-3 constant).
* ``make_optimizer``: Adafactor (T5X defaults: factored second moments, decay 0.8, update clipping
  1.0, parameter-scale multiplication) or AdamW (with decoupled weight decay, never applied to
  1-d parameters such as norms and biases), with optional global-norm gradient clipping.

Only the ``params`` collection is optimised; non-trainable collections (``frozen``) never reach
the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import gin
import jax
import jax.numpy as jnp
import optax


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
    return jax.tree.map(lambda p: p.ndim > 1, params)


@dataclasses.dataclass(frozen=True)
class OptimizerDef:
    """An optax transformation and its learning-rate schedule (for logging)."""

    tx: optax.GradientTransformation
    learning_rate: optax.Schedule

    def lr_at(self, step) -> jax.Array:
        return jnp.asarray(self.learning_rate(step), jnp.float32)


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
    if clip_grad_norm:
        tx = optax.chain(optax.clip_by_global_norm(clip_grad_norm), tx)
    return OptimizerDef(tx=tx, learning_rate=lr)
