"""The sparse MoE layer: grouping, routing, dispatch, (expert-parallel) experts, combine.

Shapes: B batch, L length, d model dim, G groups, S tokens per group, E experts, C capacity,
K choices per token.

``MoeLayer`` is composed of three typed configs, each declaring its options once:
``experts.ExpertsConfig`` (what the experts are), ``routers.RouterConfig`` (how tokens choose
them) and ``dispatch.DispatchConfig`` (groups, capacity, dropped tokens, implementation). The
layer's side outputs come back as a ``MoeAux`` value (not sown), so they survive ``nn.scan``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import checkpoint_names as names
from hypermoe_jax.layers import dispatch as dispatch_lib
from hypermoe_jax.layers import experts as experts_lib
from hypermoe_jax.layers import routers, routing

Array = jax.Array


@struct.dataclass
class MoeAux:
    """Per-layer side outputs of ``MoeLayer`` (returned, not sown, so they survive ``nn.scan``).

    Attributes:
      load_balance_loss: scalar.
      z_loss: scalar router z-loss.
      metrics: ``routing.routing_metrics`` (expert_load [E], dropped_fraction, router_entropy,
        router_confidence).
      expert_index: <int32>[B, L, K] top-k experts of each token before capacity (HyperMoE's
        unselected sets are derived from it; no gradient flows through it).
      kept: <bool>[B, L, K] whether each choice fitted into its expert's capacity.
      balance_stats: ``routing.load_balance_statistics`` -- ``(f [G, E], P [G, E],
        has_tokens [G])`` per token group, for router losses pooled over layers (HF).
    """

    load_balance_loss: Array
    z_loss: Array
    metrics: dict[str, Array]
    expert_index: Array
    kept: Array
    balance_stats: tuple[Array, Array, Array]


def static_k(active_k, num_selected: int) -> int:
    """Experts per token the routing is sized for: a static ``active_k`` (clipped to
    [1, num_selected]), else ``num_selected``."""
    if isinstance(active_k, int | np.integer):
        return int(min(max(int(active_k), 1), num_selected))
    return num_selected


class MoeLayer(nn.Module):
    """Switch / GShard sparse MLP with optional expert parallelism.

    Attributes:
      experts: the experts (E, f, activation, dropout); ``hidden_dim`` must be set.
      router: the router and the top-k choice.
      dispatch: groups, capacity, dropped tokens and the dispatch implementation.
      mesh: (data, expert, model) mesh; None runs everything on one device.
    """

    experts: experts_lib.ExpertsConfig
    router: routers.RouterConfig = routers.RouterConfig()
    dispatch: dispatch_lib.DispatchConfig = dispatch_lib.DispatchConfig()
    mesh: Mesh | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _check(self) -> None:
        if self.experts.hidden_dim is None:
            raise ValueError("ExpertsConfig.hidden_dim is None: set the experts' hidden size "
                             "(architectures fill it with their dense mlp_dim).")
        n_expert = part.mesh_axis_size(self.mesh, part.EXPERT)
        if self.experts.num_experts % n_expert:
            raise ValueError(
                f"num_experts={self.experts.num_experts} is not divisible by the mesh's expert "
                f"axis ({n_expert}); choose an expert-parallel size that divides the expert "
                "count."
            )
        if not 1 <= self.router.num_selected <= self.experts.num_experts:
            raise ValueError(f"num_selected must be in [1, {self.experts.num_experts}], got "
                             f"{self.router.num_selected}")

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        deterministic: bool = True,
        padding_mask: Array | None = None,
        active_k: Array | int | None = None,
        adapters: dict[str, Array] | None = None,
    ) -> tuple[Array, MoeAux]:
        """Applies the layer.

        Args:
          x: <[B, L, d]> token features.
          deterministic: eval mode (no jitter, no dropout, eval capacity factor).
          padding_mask: optional <[B, L]>, nonzero for real tokens (never dispatched).
          active_k: optional number of experts per token (<= num_selected). A Python int routes
            with that many experts (top-k and capacity sized for it: evaluating at k costs what
            k costs; one compilation per k); a traced value masks ranks >= k of the top
            ``num_selected`` (SMoE-Dropout's growing k in training; one compilation for all k).
          adapters: optional fused companion adapters (``experts.ADAPTER_KEYS``, leading dim E),
            applied ungated to the tokens each expert keeps; top-1 only.

        Returns:
          ``(y <[B, L, d]>, MoeAux)``.
        """
        self._check()
        ecfg, rcfg, dcfg = self.experts, self.router, self.dispatch
        num_experts, num_selected = ecfg.num_experts, static_k(active_k, rcfg.num_selected)
        if isinstance(active_k, int | np.integer):
            active_k = None  # a static k sizes the routing itself (top-k and capacity)
        if adapters is not None and num_selected != 1:
            raise ValueError("Fused adapters are defined for top-1 routing only (num_selected=1).")
        batch, seq_len, d_model = x.shape
        num_groups, group_size = dcfg.groups(batch * seq_len, seq_len, self.mesh)
        xg = x.reshape(num_groups, group_size, d_model)
        xg = part.with_logical_constraint(xg, (part.EXPERT_GROUP, part.LENGTH, part.EMBED))
        mask = None if padding_mask is None else padding_mask.reshape(num_groups, group_size)

        logits = routers.Router(num_experts, rcfg, name="router")(
            xg, deterministic=deterministic)
        logits = names.checkpoint_name(logits, names.ROUTER_LOGITS)
        capacity = dcfg.capacity(group_size, num_experts, num_selected, deterministic)
        r = routing.route_tokens(
            logits,
            num_selected=num_selected,
            capacity=capacity,
            padding_mask=mask,
            active_k=active_k,
            batch_prioritized=rcfg.batch_prioritized,
            gate_normalization=rcfg.gates,
        )
        weights = experts_lib.MlpExperts(
            num_experts=num_experts,
            hidden_dim=ecfg.hidden_dim,
            activation=ecfg.activation or "relu",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="experts",
        )(d_model)
        use_dropout = ecfg.dropout_rate > 0 and not deterministic
        y = dispatch_lib.run_experts(
            xg,
            dispatch_lib.make_dispatch(r, dcfg.impl, capacity, dcfg.dropless_exchange),
            weights,
            activation=ecfg.activation or "relu",
            mesh=self.mesh,
            adapters=adapters,
            dropout_rate=ecfg.dropout_rate,
            dropout_rng=self.make_rng("dropout") if use_dropout else None,
            dtype=self.dtype,
        )
        if dcfg.dropped_token_behavior == "scale_input":
            dropped = (r.active[..., 0] & ~r.kept[..., 0]).astype(self.dtype)
            y = y + (dropped * r.gates[..., 0])[..., None] * xg.astype(self.dtype)
        y = part.with_logical_constraint(y, (part.EXPERT_GROUP, part.LENGTH, part.EMBED))
        y = names.checkpoint_name(y, names.MOE_OUT)
        balance_stats = routing.load_balance_statistics(r)
        aux = MoeAux(
            load_balance_loss=routing.balance_loss_from_statistics(*balance_stats),
            z_loss=routing.router_z_loss(r),
            metrics=routing.routing_metrics(r),
            expert_index=r.expert_index.reshape(batch, seq_len, num_selected),
            kept=r.kept.reshape(batch, seq_len, num_selected),
            balance_stats=balance_stats,
        )
        return y.reshape(batch, seq_len, d_model).astype(x.dtype), aux
