"""Routers: where the router logits ``[..., E]`` come from, and how tokens choose experts.

``RouterConfig`` declares every routing option once; ``Router`` turns token features into float32
logits; ``routing.route_tokens`` turns logits into a ``routing.Routing`` with the config's
``num_selected``, ``gate_normalization`` and ``batch_prioritized``.

Router kinds (``RouterConfig.kind``):

* ``linear``        -- a trainable ``[d, E]`` kernel (Switch / GShard);
* ``frozen_random`` -- a random ``[d, E]`` kernel, N(0, 0.02), never trained (SMoE-Dropout). It
  lives in the ``frozen`` variable collection, not in ``params``: optimizers never see it,
  checkpoints keep it;
* ``hyper``         -- HyperRouter: a trainable router embedding ``r`` and a frozen per-layer
  hypernetwork ``H(r) = L2 relu(L1 r)`` generating ``[E, d + 1]`` router weights and biases.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax import partitioning as part

Array = jax.Array

# The variable collection of weights that are saved but never trained.
FROZEN = "frozen"
# The rng stream of router jitter.
JITTER = "jitter"

RouterKind = Literal["linear", "frozen_random", "hyper"]
ROUTER_KINDS = ("linear", "frozen_random", "hyper")
GateNormalization = Literal["none", "softmax_topk"]
GATE_NORMALIZATIONS = ("none", "softmax_topk")

default_router_init = nn.initializers.normal(stddev=2e-2)


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """How tokens choose their experts.

    Attributes:
      kind: ``linear`` | ``frozen_random`` | ``hyper`` (module docstring); None = the variant's
        (``variants.moe_config`` sets it), ``linear`` when the layer is used on its own.
      num_selected: K, the (maximum) number of experts per token (1 = Switch top-1).
      jitter_noise: multiplicative jitter ``U(1 - eps, 1 + eps)`` on the router inputs in training
        (rng stream ``jitter``).
      use_bias: a trainable router bias (``linear`` only; HyperRouter generates its own bias).
      gate_normalization: ``none`` -- the gate is the softmax over all experts (Switch: the router
        also learns from the task loss); ``softmax_topk`` -- softmax over the selected logits
        (SMoE-Dropout, HyperRouter); None = ``softmax_topk`` for the ``hyper`` and
        ``frozen_random`` kinds (as their official code), ``none`` for ``linear``.
      batch_prioritized: Batch Prioritized Routing (Riquelme et al. 2021): within a rank, tokens
        with a higher top-1 probability get slots first. Encoders only (it looks at the whole
        group); decoders ignore it.
      hyper_embed_dim: HyperRouter embedding size d_r (None = d_model, as the official code).
      hyper_hidden_dim: HyperRouter hypernetwork hidden size.
    """

    kind: RouterKind | None = None
    num_selected: int = 1
    jitter_noise: float = 0.0
    use_bias: bool = False
    gate_normalization: GateNormalization | None = None
    batch_prioritized: bool = False
    hyper_embed_dim: int | None = None
    hyper_hidden_dim: int = 256

    def __post_init__(self):
        if self.kind is not None and self.kind not in ROUTER_KINDS:
            raise ValueError(f"Unknown router kind {self.kind!r}; use one of {ROUTER_KINDS} "
                             "(RouterConfig.kind).")
        if self.num_selected < 1:
            raise ValueError(f"RouterConfig.num_selected must be >= 1, got {self.num_selected}.")
        if self.gate_normalization is not None and (
                self.gate_normalization not in GATE_NORMALIZATIONS):
            raise ValueError(f"Unknown gate_normalization {self.gate_normalization!r}; use one of "
                             f"{GATE_NORMALIZATIONS} (RouterConfig.gate_normalization).")
        if self.jitter_noise < 0:
            raise ValueError(f"RouterConfig.jitter_noise must be >= 0, got {self.jitter_noise}.")

    @property
    def router_kind(self) -> str:
        return self.kind or "linear"

    @property
    def gates(self) -> str:
        """The gate normalization in force (``gate_normalization`` or the kind's default)."""
        if self.gate_normalization is not None:
            return self.gate_normalization
        return "none" if self.router_kind == "linear" else "softmax_topk"


def apply_jitter(x: Array, noise: float, rng: Array) -> Array:
    """Multiplicative jitter ``x * U(1 - noise, 1 + noise)`` (Switch)."""
    return x * jax.random.uniform(rng, x.shape, x.dtype, 1.0 - noise, 1.0 + noise)


class Router(nn.Module):
    """Produces float32 router logits ``[..., E]`` from token features ``[..., d]``."""

    num_experts: int
    config: RouterConfig = RouterConfig()
    kernel_init: nn.initializers.Initializer = default_router_init

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        cfg = self.config
        x = x.astype(jnp.float32)
        if cfg.jitter_noise > 0 and not deterministic:
            x = apply_jitter(x, cfg.jitter_noise, self.make_rng(JITTER))
        d_model = x.shape[-1]
        kind = cfg.router_kind
        if kind == "linear":
            kernel = self.param(
                "kernel",
                nn.with_logical_partitioning(self.kernel_init, (part.EMBED, part.UNMODELED)),
                (d_model, self.num_experts),
                jnp.float32,
            )
            logits = jnp.einsum("...d,de->...e", x, kernel)
            if cfg.use_bias:
                bias = self.param(
                    "bias",
                    nn.with_logical_partitioning(nn.initializers.zeros, (part.UNMODELED,)),
                    (self.num_experts,),
                    jnp.float32,
                )
                logits = logits + bias
            return logits
        if kind == "frozen_random":
            kernel = self.variable(
                FROZEN,
                "kernel",
                lambda: nn.initializers.normal(0.02)(
                    self.make_rng("params"), (d_model, self.num_experts), jnp.float32
                ),
            ).value
            return jnp.einsum("...d,de->...e", x, jax.lax.stop_gradient(kernel))
        weight, bias = HyperRouterWeights(
            num_experts=self.num_experts,
            embed_dim=cfg.hyper_embed_dim,
            hidden_dim=cfg.hyper_hidden_dim,
            name="hyper",
        )(d_model)
        return jnp.einsum("...d,ed->...e", x, weight) + bias


class HyperRouterWeights(nn.Module):
    """HyperRouter: router weights generated by a frozen hypernetwork from a trainable embedding.

    ``r``: trainable, N(0, 1), shape [d_r]. ``H(r) = L2 relu(L1 r + c1) + c2`` with
    L1: d_r -> hidden, L2: hidden -> E*(d+1), N(0, 0.02), biases 0, all frozen (collection
    ``frozen``).
    Returns ``W`` <float32>[E, d] and ``b`` <float32>[E] from ``reshape(H(r), [E, d + 1])``.
    """

    num_experts: int
    embed_dim: int | None = None
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, d_model: int) -> tuple[Array, Array]:
        d_r = self.embed_dim or d_model
        out = self.num_experts * (d_model + 1)
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), (part.HYPER,)),
            (d_r,),
            jnp.float32,
        )

        def frozen(name, shape, init):
            return self.variable(
                FROZEN, name, lambda: init(self.make_rng("params"), shape, jnp.float32)
            ).value

        normal = nn.initializers.normal(0.02)
        zeros = nn.initializers.zeros
        l1_kernel = frozen("l1_kernel", (d_r, self.hidden_dim), normal)
        l1_bias = frozen("l1_bias", (self.hidden_dim,), zeros)
        l2_kernel = frozen("l2_kernel", (self.hidden_dim, out), normal)
        l2_bias = frozen("l2_bias", (out,), zeros)
        frozen_params = jax.lax.stop_gradient((l1_kernel, l1_bias, l2_kernel, l2_bias))
        l1_kernel, l1_bias, l2_kernel, l2_bias = frozen_params
        h = jax.nn.relu(embedding @ l1_kernel + l1_bias)
        flat = (h @ l2_kernel + l2_bias).reshape(self.num_experts, d_model + 1)
        return flat[:, :d_model], flat[:, d_model]
