"""Batched expert MLPs ``[E, d, f]`` and expert-indexed bottleneck adapters.

``ExpertsConfig`` declares the experts (how many, hidden size, activation, dropout).
``MlpExperts`` only owns the weights (with logical axis names); the computation is the pure
function ``expert_mlp`` so that the MoE layer can run it inside ``jax.shard_map`` on the local
expert shard (weights ``[E_local, d, f_local]``) with an optional ``psum`` over the ``model`` axis.
``adapter_mlp`` applies per-expert bottleneck adapters (HyperMoE's fused HyperExperts) the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import checkpoint_names

Array = jax.Array
Activation = Literal["relu", "gelu", "silu", "gated-gelu", "gated-silu"]
ACTIVATIONS = ("relu", "gelu", "silu", "gated-gelu", "gated-silu")

# T5X's MoE init: fan-in truncated normal on [E, d_in, d_out], E a batch axis.
default_expert_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def is_gated(activation: str) -> bool:
    return activation.startswith("gated-")


def activation_fn(activation: str):
    """The elementwise function of an MLP activation name (gated ones: of the gate branch)."""
    if activation == "relu":
        return jax.nn.relu
    if activation in ("gelu", "gated-gelu"):
        return lambda v: jax.nn.gelu(v, approximate=True)
    if activation in ("silu", "gated-silu"):
        return jax.nn.silu
    raise ValueError(f"Unknown activation {activation!r}; choose one of {ACTIVATIONS}.")


@dataclasses.dataclass(frozen=True)
class ExpertsConfig:
    """The experts of an MoE layer.

    Attributes:
      num_experts: E.
      hidden_dim: f of each expert; None = the architecture's dense ``mlp_dim`` (a layer used on
        its own needs it set).
      activation: one of ``ACTIVATIONS``; None = the architecture's MLP activation (``relu`` for a
        layer used on its own).
      dropout_rate: dropout on the experts' hidden activations (training only).
    """

    num_experts: int = 8
    hidden_dim: int | None = None
    activation: Activation | None = None
    dropout_rate: float = 0.0

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"ExpertsConfig.num_experts must be >= 1, got {self.num_experts}.")
        if self.activation is not None:
            activation_fn(self.activation)  # validate early
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(
                f"ExpertsConfig.dropout_rate must be in [0, 1), got {self.dropout_rate}.")

    def with_defaults(self, hidden_dim: int, activation: str) -> ExpertsConfig:
        """This config with its unset fields taken from the architecture's dense MLP."""
        return dataclasses.replace(self, hidden_dim=self.hidden_dim or hidden_dim,
                                   activation=self.activation or activation)


class MlpExperts(nn.Module):
    """The expert weights: ``wi [E, d, f]`` (gated: ``wi_0``, ``wi_1``), ``wo [E, f, d]``."""

    num_experts: int
    hidden_dim: int
    activation: Activation = "relu"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = default_expert_init

    @nn.compact
    def __call__(self, d_model: int) -> dict[str, Array]:
        activation_fn(self.activation)  # validate early
        e, f = self.num_experts, self.hidden_dim
        wi_axes = (part.EXPERTS, part.EMBED, part.EXPERT_MLP)
        wo_axes = (part.EXPERTS, part.EXPERT_MLP, part.EMBED)
        init_in = nn.with_logical_partitioning(self.kernel_init, wi_axes)
        init_out = nn.with_logical_partitioning(self.kernel_init, wo_axes)
        names = ("wi_0", "wi_1") if is_gated(self.activation) else ("wi",)
        weights = {n: self.param(n, init_in, (e, d_model, f), self.param_dtype) for n in names}
        weights["wo"] = self.param("wo", init_out, (e, f, d_model), self.param_dtype)
        return weights


def expert_weight_specs(weights: dict[str, Array]) -> dict[str, tuple[str, ...]]:
    """Logical axes of each expert weight (used to build shard_map specs)."""
    return {
        n: (part.EXPERTS, part.EXPERT_MLP, part.EMBED)
        if n == "wo"
        else (part.EXPERTS, part.EMBED, part.EXPERT_MLP)
        for n in weights
    }


def expert_mlp(
    weights: dict[str, Array],
    x: Array,
    *,
    activation: str,
    dtype: jnp.dtype = jnp.float32,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
) -> Array:
    """Applies each expert to its tokens.

    Args:
      weights: ``wi``/``wi_0``/``wi_1`` <[E, d, f]>, ``wo`` <[E, f, d]> (possibly local shards).
      x: <[E, G, C, d]> tokens dispatched to each expert.
      dropout_rate: dropout on the hidden activation (needs ``dropout_rng``).

    Returns:
      <[E, G, C, d]>; when ``f`` is sharded the caller sums the partial results over ``model``.
    """
    act = activation_fn(activation)
    x = x.astype(dtype)
    if is_gated(activation):
        h = act(jnp.einsum("egcd,edf->egcf", x, weights["wi_0"].astype(dtype)))
        h = h * jnp.einsum("egcd,edf->egcf", x, weights["wi_1"].astype(dtype))
    else:
        h = act(jnp.einsum("egcd,edf->egcf", x, weights["wi"].astype(dtype)))
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout_rate), 0.0)
    h = checkpoint_names.checkpoint_name(h, checkpoint_names.MOE_EXPERT_HIDDEN)
    return jnp.einsum("egcf,efd->egcd", h, weights["wo"].astype(dtype))


# Keys of an expert-indexed bottleneck adapter (HyperMoE's HyperExperts, MoE-Share's adapter).
ADAPTER_KEYS = ("w_down", "b_down", "w_up", "b_up")


def adapter_mlp(adapters: dict[str, Array], x: Array, dtype: jnp.dtype = jnp.float32) -> Array:
    """Expert-indexed bottleneck adapters ``relu(x W_down[e] + b_down[e]) W_up[e] + b_up[e]``.

    Args:
      adapters: ``w_down`` <[E, d, b]>, ``b_down`` <[E, b]>, ``w_up`` <[E, b, d]>,
        ``b_up`` <[E, d]>.
      x: <[E, G, C, d]> tokens dispatched to each expert.
    """
    x = x.astype(dtype)
    h = jnp.einsum("egcd,edb->egcb", x, adapters["w_down"].astype(dtype))
    h = jax.nn.relu(h + adapters["b_down"].astype(dtype)[:, None, None, :])
    y = jnp.einsum("egcb,ebd->egcd", h, adapters["w_up"].astype(dtype))
    return y + adapters["b_up"].astype(dtype)[:, None, None, :]
