"""HyperMoE's HyperExperts: generated from the experts a token did NOT select (Zhao et al. 2024).

Shapes: L MoE layers of a stack, N experts, K experts per token, M distinct unselected sets,
d model dim, b adapter bottleneck, T tokens, d_e expert-embedding dim, h hypernetwork hidden dim.

Exact and efficient. The hypernetwork input ``z = [s(U) ; l_m]`` depends only on the unselected
set ``U`` and the layer m, never on token features. With top-1 there are N sets per layer
(``U_i = all \\ {i}``), so ``HyperExpertGenerator()`` generates the N HyperExperts of every MoE
layer in one batched call (leaves ``[L, N, ...]``) and each token gets the companion adapter of its
selected expert. For top-k it generates one adapter per k-subset (in colexicographic order, see
``combination_ids``) while C(N, k) <= ``max_sets``; beyond that it hands the layers what they need
to run the hypernetwork per token (``per_token_hyper_experts``), which still never builds per-token
weights ``[T, d, b]``.

``HyperExpertsConfig`` declares the sizes and the placement:

* ``dense`` -- every token (dropped ones included) gets the HyperExpert of its top-k set before
  capacity, exactly as the official code (``apply_hyper_experts``: tokens sorted by adapter through
  ``grouped.grouped_adapter_mlp``);
* ``fused`` -- top-1 only: the layer's N adapters ride along the expert-parallel path and run
  beside expert i* on the tokens it keeps (``dispatch.run_experts(adapters=...)``); differs from
  ``dense`` only for dropped tokens.

With dropless dispatch (``DispatchConfig(impl='dropless')``) and top-1 nothing is dropped, so both
placements are the companion adapter of the expert each token reaches: the HyperExperts ride the
experts' grouping (``layers/dropless.py``: one sort, ``ragged_dot`` for both).

One ``HyperExpertGenerator`` per stack lives OUTSIDE the layer scan (its hypernetwork is shared by
all MoE layers of the stack); the m-th MoE layer gets ``jax.tree.map(lambda a: a[m], gen())``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.layers import backend, experts, grouped

Array = jax.Array
Placement = Literal["dense", "fused"]
PLACEMENTS = ("dense", "fused")


@dataclasses.dataclass(frozen=True)
class HyperExpertsConfig:
    """HyperMoE's HyperExperts (defaults: the official code's sizes).

    Attributes:
      placement: ``dense`` (exact to the official code) or ``fused`` (top-1; module docstring).
      bottleneck_dim: b of the generated adapters ``d -> b -> d``.
      expert_embed_dim: d_e of the per-layer expert embeddings.
      selection_hidden_dim / selection_dim: the selection MLP ``d_e -> hidden -> selection_dim``.
      layer_embed_dim: size of the layer embeddings (one table per stack).
      hyper_hidden_dim: h of the shared hypernetwork.
      max_sets: top-k generates one adapter per k-subset while C(N, k) <= max_sets, else runs the
        hypernetwork per token.
      grouped_impl: the dense placement's grouped matmul (``grouped.GROUPED_IMPLS`` or ``auto``, by
        backend: ``backend.DEFAULTS``).
      block_size / grouped_capacity_factor: the ``blocked`` grouped matmul's layouts.
    """

    placement: Placement = "dense"
    bottleneck_dim: int = 64
    expert_embed_dim: int = 128
    selection_hidden_dim: int = 128
    selection_dim: int = 128
    layer_embed_dim: int = 10
    hyper_hidden_dim: int = 128
    max_sets: int = 256
    grouped_impl: grouped.GroupedImpl = "auto"
    block_size: int = 128
    grouped_capacity_factor: float | tuple[float, ...] | None = (
        grouped.DEFAULT_GROUPED_CAPACITY_FACTORS)

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r} "
                             "(HyperExpertsConfig.placement)")
        backend.check("grouped_matmul", self.grouped_impl, grouped.GROUPED_IMPLS,
                      "HyperExpertsConfig.grouped_impl")
        if isinstance(self.grouped_capacity_factor, list):
            object.__setattr__(self, "grouped_capacity_factor",
                               tuple(self.grouped_capacity_factor))


# Keys of the per-token generator output (``HyperExpertGenerator`` when C(N, k) > max_sets).
HEAD_KEYS = (
    "w_down_kernel", "w_down_bias", "b_down_kernel", "b_down_bias",
    "w_up_kernel", "w_up_bias", "b_up_kernel", "b_up_bias",
)
PER_TOKEN_KEYS = (
    "expert_embedding", "selection_w1", "selection_b1", "selection_w2", "selection_b2",
    "hidden_kernel", "hidden_bias", *HEAD_KEYS,
)

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------
# Initializers (as the official code)
# --------------------------------------------------------------------------------------------


def fan_in_uniform(fan_in: int) -> nn.initializers.Initializer:
    """``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``: PyTorch's default ``nn.Linear`` init (weight and
    bias), which the official code keeps for the selection MLP and the hypernetwork hidden layer."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def hyperfanin_uniform(hyper_in: int, main_in: int = 1) -> nn.initializers.Initializer:
    """Hyperfanin init of a hypernetwork head: ``U(+-1e-3 * sqrt(3 / (hyper_in * main_in)))``.

    ``main_in`` is the fan-in of the generated weight (d for W_down, b for W_up, 1 for biases).
    """
    bound = 1e-3 * math.sqrt(3.0 / (hyper_in * main_in))

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --------------------------------------------------------------------------------------------
# Unselected sets
# --------------------------------------------------------------------------------------------


def combinations(num_experts: int, num_selected: int) -> np.ndarray:
    """All k-subsets of ``range(N)`` in colexicographic order: <int32>[C(N, k), k], rows sorted.

    Row m is the subset whose id (``combination_ids``) is m; for k = 1 row i is ``[i]``.
    """
    combos = sorted(itertools.combinations(range(num_experts), num_selected), key=lambda c: c[::-1])
    return np.asarray(combos, np.int32).reshape(-1, num_selected)


def unselected_masks(num_experts: int, num_selected: int) -> np.ndarray:
    """<float32>[C(N, k), N]: row m is 1 on the experts NOT in subset m."""
    combos = combinations(num_experts, num_selected)
    mask = np.ones((len(combos), num_experts), np.float32)
    np.put_along_axis(mask, combos, 0.0, axis=1)
    return mask


def combination_ids(expert_index: Array, num_experts: int) -> Array:
    """Colexicographic rank of each token's top-k set (order within the set does not matter).

    Args:
      expert_index: <int>[..., K] the top-k experts (distinct).

    Returns:
      <int32>[...] in ``[0, C(N, K))``: ``sum_i C(c_i, i + 1)`` for the sorted set c_0 < c_1 < ...
      (for K = 1 simply the expert index).
    """
    k = expert_index.shape[-1]
    if k == 1:
        return expert_index[..., 0].astype(jnp.int32)
    table = np.array(
        [[math.comb(c, i + 1) for i in range(k)] for c in range(num_experts)], np.int64
    )
    if table.max() >= 2**31:
        raise ValueError(f"C({num_experts}, {k}) is too large to index subsets with int32.")
    table = jnp.asarray(table.astype(np.int32))  # [N, K]
    sorted_idx = jnp.sort(expert_index, axis=-1)
    return jnp.sum(table[sorted_idx, jnp.arange(k)], axis=-1).astype(jnp.int32)


def uses_per_set_adapters(num_experts: int, num_selected: int, max_sets: int) -> bool:
    """Whether the generator makes one adapter per subset (always for top-1) or defers to a
    per-token hypernetwork pass (top-k with C(N, k) > max_sets)."""
    return num_selected == 1 or math.comb(num_experts, num_selected) <= max_sets


# --------------------------------------------------------------------------------------------
# The shared hypernetwork and the per-stack generator
# --------------------------------------------------------------------------------------------


class HyperNetwork(nn.Module):
    """``z -> (W_down [d, b], b_down [b], W_up [b, d], b_up [d])``, shared by all layers of a stack.

    ``h = relu(z A + a)``; each head is a linear map of h (with a bias, zero at init), reshaped
    row-major as the official ``view``: ``W_down = reshape(h D + D_0, [d, b])`` etc. Heads use the
    hyperfanin init; the hidden layer PyTorch's default. Head kernels are stored already reshaped
    (``w_down_kernel`` <[h, d, b]>), which is the same parameterisation.
    """

    d_model: int
    bottleneck_dim: int = 64
    hidden_dim: int = 128
    input_dim: int = 138
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    def setup(self):
        d, b, h, zin = self.d_model, self.bottleneck_dim, self.hidden_dim, self.input_dim
        zeros = nn.initializers.zeros

        def p(name, init, shape, axes):
            init = nn.with_logical_partitioning(init, axes)
            return self.param(name, init, shape, self.param_dtype)

        self.hidden_kernel = p("hidden_kernel", fan_in_uniform(zin), (zin, h),
                               (part.UNMODELED, part.HYPER))
        self.hidden_bias = p("hidden_bias", fan_in_uniform(zin), (h,), (part.HYPER,))
        self.w_down_kernel = p("w_down_kernel", hyperfanin_uniform(h, d), (h, d, b),
                               (part.HYPER, part.EMBED, part.UNMODELED))
        self.w_down_bias = p("w_down_bias", zeros, (d, b), (part.EMBED, part.UNMODELED))
        self.b_down_kernel = p("b_down_kernel", hyperfanin_uniform(h), (h, b),
                               (part.HYPER, part.UNMODELED))
        self.b_down_bias = p("b_down_bias", zeros, (b,), (part.UNMODELED,))
        self.w_up_kernel = p("w_up_kernel", hyperfanin_uniform(h, b), (h, b, d),
                             (part.HYPER, part.UNMODELED, part.EMBED))
        self.w_up_bias = p("w_up_bias", zeros, (b, d), (part.UNMODELED, part.EMBED))
        self.b_up_kernel = p("b_up_kernel", hyperfanin_uniform(h), (h, d), (part.HYPER, part.EMBED))
        self.b_up_bias = p("b_up_bias", zeros, (d,), (part.EMBED,))

    def head_params(self) -> dict[str, Array]:
        return {k: getattr(self, k) for k in HEAD_KEYS}

    def hidden(self, z: Array) -> Array:
        """<[..., input_dim]> -> <[..., hidden_dim]>."""
        pre = jnp.einsum("...i,ih->...h", z, self.hidden_kernel, precision=self.precision)
        return jax.nn.relu(pre + self.hidden_bias)

    def heads(self, h: Array) -> dict[str, Array]:
        """<[..., hidden_dim]> -> adapters ``w_down [..., d, b]``, ``b_down [..., b]``,
        ``w_up [..., b, d]``, ``b_up [..., d]``."""
        ein = functools.partial(jnp.einsum, precision=self.precision)
        return {
            "w_down": ein("...h,hdb->...db", h, self.w_down_kernel) + self.w_down_bias,
            "b_down": ein("...h,hb->...b", h, self.b_down_kernel) + self.b_down_bias,
            "w_up": ein("...h,hbd->...bd", h, self.w_up_kernel) + self.w_up_bias,
            "b_up": ein("...h,hd->...d", h, self.b_up_kernel) + self.b_up_bias,
        }

    def __call__(self, z: Array) -> dict[str, Array]:
        return self.heads(self.hidden(z))


class HyperExpertGenerator(nn.Module):
    """Generates the HyperExperts of all MoE layers of a stack in one batched call.

    Per-layer parameters are stacked on a leading ``layers`` axis: expert embeddings
    ``expert_embedding`` <[L, N, d_e]> (N(0, 1)), the selection MLP ``selection_w1/b1/w2/b2``
    (``s = W2 relu(W1 s~ + b1) + b2``, PyTorch default init) and the layer embeddings
    ``layer_embedding`` <[L, 10]> (N(0, 1), one table for the stack). The hypernetwork
    (``hypernet``) is shared.

    Returns ``hyper_inputs`` (every leaf with leading axis L):

    * C(N, k) <= ``max_sets`` or k = 1 (per-set adapters): ``experts.ADAPTER_KEYS`` --
      ``w_down`` <[L, M, d, b]>, ``b_down`` <[L, M, b]>, ``w_up`` <[L, M, b, d]>,
      ``b_up`` <[L, M, d]>; M = C(N, k), adapter m belongs to the tokens whose top-k set has
      ``combination_ids`` m (for top-1: the companion adapter of expert m).
      Cost: ``L * M * h * 2 d b`` MACs per step.
    * otherwise (per-token): ``PER_TOKEN_KEYS`` -- the per-layer embeddings and selection MLP, the
      hypernetwork's hidden layer split into ``hidden_kernel`` <[L, s, h]> (broadcast) and
      ``hidden_bias`` <[L, h]> (``l_m A_l + a``), and the head parameters broadcast to ``[L, ...]``;
      ``per_token_hyper_experts`` runs the rest per token.
    """

    num_layers: int
    num_experts: int
    num_selected: int
    d_model: int
    config: HyperExpertsConfig = HyperExpertsConfig()
    param_dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @property
    def per_set(self) -> bool:
        return uses_per_set_adapters(self.num_experts, self.num_selected, self.config.max_sets)

    def setup(self):
        if not 1 <= self.num_selected < self.num_experts:
            raise ValueError(
                "HyperMoE needs 1 <= num_selected < num_experts (some experts must stay "
                f"unselected), got num_selected={self.num_selected}, "
                f"num_experts={self.num_experts}."
            )
        cfg = self.config
        n_l, n, de = self.num_layers, self.num_experts, cfg.expert_embed_dim
        p_dim, s_dim = cfg.selection_hidden_dim, cfg.selection_dim

        def p(name, init, shape, axes):
            init = nn.with_logical_partitioning(init, axes)
            return self.param(name, init, shape, self.param_dtype)

        layers, hyper, unmodeled = part.LAYERS, part.HYPER, part.UNMODELED
        self.expert_embedding = p("expert_embedding", nn.initializers.normal(1.0), (n_l, n, de),
                                  (layers, unmodeled, hyper))
        self.selection_w1 = p("selection_w1", fan_in_uniform(de), (n_l, de, p_dim),
                              (layers, unmodeled, hyper))
        self.selection_b1 = p("selection_b1", fan_in_uniform(de), (n_l, p_dim), (layers, hyper))
        self.selection_w2 = p("selection_w2", fan_in_uniform(p_dim), (n_l, p_dim, s_dim),
                              (layers, unmodeled, hyper))
        self.selection_b2 = p("selection_b2", fan_in_uniform(p_dim), (n_l, s_dim), (layers, hyper))
        self.layer_embedding = p("layer_embedding", nn.initializers.normal(1.0),
                                 (n_l, cfg.layer_embed_dim), (layers, hyper))
        self.hypernet = HyperNetwork(
            d_model=self.d_model,
            bottleneck_dim=cfg.bottleneck_dim,
            hidden_dim=cfg.hyper_hidden_dim,
            input_dim=s_dim + cfg.layer_embed_dim,
            param_dtype=self.param_dtype,
            precision=self.precision,
        )

    def _selection_mlp(self, s_tilde: Array) -> Array:
        """<[L, M, d_e]> -> <[L, M, s]>."""
        ein = functools.partial(jnp.einsum, precision=self.precision)
        h = jax.nn.relu(ein("lme,lep->lmp", s_tilde, self.selection_w1)
                        + self.selection_b1[:, None, :])
        return ein("lmp,lps->lms", h, self.selection_w2) + self.selection_b2[:, None, :]

    def __call__(self) -> dict[str, Array]:
        if self.per_set:
            return self.per_set_adapters()
        return self.per_token_inputs()

    def per_set_adapters(self) -> dict[str, Array]:
        """One HyperExpert per unselected set and layer: leaves <[L, M, ...]>."""
        masks = jnp.asarray(unselected_masks(self.num_experts, self.num_selected), jnp.float32)
        # [M, N] x [L, N, d_e] -> [L, M, d_e]: the plain sum of the unselected embeddings.
        s_tilde = jnp.einsum("mn,lne->lme", masks, self.expert_embedding.astype(jnp.float32),
                             precision=_HIGHEST).astype(self.param_dtype)
        s = self._selection_mlp(s_tilde)
        n_l, m = s.shape[:2]
        layer = jnp.broadcast_to(self.layer_embedding[:, None, :],
                                 (n_l, m, self.config.layer_embed_dim))
        return self.hypernet(jnp.concatenate([s, layer], axis=-1))

    def per_token_inputs(self) -> dict[str, Array]:
        """What ``per_token_hyper_experts`` needs, every leaf <[L, ...]>."""
        n_l, s_dim = self.num_layers, self.config.selection_dim
        kernel = self.hypernet.hidden_kernel  # [s + l, h]
        hidden_bias = (
            jnp.einsum("li,ih->lh", self.layer_embedding, kernel[s_dim:], precision=self.precision)
            + self.hypernet.hidden_bias
        )

        def bcast(a):
            return jnp.broadcast_to(a, (n_l, *a.shape))

        out = {
            "expert_embedding": self.expert_embedding,
            "selection_w1": self.selection_w1,
            "selection_b1": self.selection_b1,
            "selection_w2": self.selection_w2,
            "selection_b2": self.selection_b2,
            "hidden_kernel": bcast(kernel[:s_dim]),
            "hidden_bias": hidden_bias,
        }
        out.update({k: bcast(v) for k, v in self.hypernet.head_params().items()})
        return out


# --------------------------------------------------------------------------------------------
# Applying HyperExperts (pure functions on one layer's slice of ``hyper_inputs``)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Applying HyperExperts (pure functions on one layer's slice of ``hyper_inputs``)
# --------------------------------------------------------------------------------------------


def per_token_hyper_experts(
    inputs: dict[str, Array],
    x: Array,
    selected: Array,
    *,
    dtype: jnp.dtype = jnp.float32,
    precision: jax.lax.PrecisionLike = None,
) -> Array:
    """The HyperExpert of each token from its own selection, without per-token weights.

    Args:
      inputs: one layer's slice of the per-token generator output (``PER_TOKEN_KEYS``).
      x: <[T, d]>.
      selected: <float>[T, N] 1 on each token's (active) top-k experts.

    The hypernetwork hidden state ``h_t`` <[T, h]> is computed per token (cheap); the heads are
    then contracted with x first: ``x W_down(h_t) = sum_c h_tc (x D_c) + x D_0`` via
    ``u = x D`` <[T, h, b]>, and the up projection as ``(r_t (x) h_t) @ U`` with ``U`` <[h b, d]>.
    Cost ``T * h * 2 d b`` MACs (h = 128 times the per-set form) and ``T * h * b`` memory instead of
    the official ``T * d * b`` per-token weights.
    """
    ein = functools.partial(jnp.einsum, precision=precision)
    unselected = (1.0 - selected).astype(jnp.float32)
    s_tilde = jnp.einsum("tn,ne->te", unselected,
                         inputs["expert_embedding"].astype(jnp.float32), precision=_HIGHEST)
    s_tilde = s_tilde.astype(inputs["selection_w1"].dtype)
    s = jax.nn.relu(ein("te,ep->tp", s_tilde, inputs["selection_w1"]) + inputs["selection_b1"])
    s = ein("tp,ps->ts", s, inputs["selection_w2"]) + inputs["selection_b2"]
    h = jax.nn.relu(ein("ts,sh->th", s, inputs["hidden_kernel"]) + inputs["hidden_bias"])
    h = h.astype(dtype)
    x = x.astype(dtype)
    w = {k: inputs[k].astype(dtype) for k in HEAD_KEYS}
    num_tokens, hidden = h.shape
    bneck = w["b_down_bias"].shape[0]
    u = ein("td,hdb->thb", x, w["w_down_kernel"])  # [T, h, b]
    pre = (ein("thb,th->tb", u, h) + ein("td,db->tb", x, w["w_down_bias"])
           + ein("th,hb->tb", h, w["b_down_kernel"]) + w["b_down_bias"])
    r = jax.nn.relu(pre)  # [T, b]
    outer = (h[:, :, None] * r[:, None, :]).reshape(num_tokens, hidden * bneck)
    y = ein("tk,kd->td", outer, w["w_up_kernel"].reshape(hidden * bneck, -1))
    return (y + ein("tb,bd->td", r, w["w_up_bias"])
            + ein("th,hd->td", h, w["b_up_kernel"]) + w["b_up_bias"])


def selected_mask(expert_index: Array, num_experts: int, active_k: Array | int | None = None):
    """<float32>[..., N]: 1 on each token's top-k (ranks < active_k when given)."""
    k = expert_index.shape[-1]
    onehot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [..., K, N]
    if active_k is not None:
        onehot = onehot * (jnp.arange(k) < active_k).astype(jnp.float32)[:, None]
    return jnp.sum(onehot, axis=-2)


def apply_hyper_experts(
    hyper_inputs: dict[str, Array],
    x: Array,
    expert_index: Array,
    *,
    num_experts: int,
    active_k: Array | int | None = None,
    impl: grouped.GroupedImpl = "auto",
    block_size: int = 128,
    capacity_factor: float | Sequence[float] | None = grouped.DEFAULT_GROUPED_CAPACITY_FACTORS,
    dtype: jnp.dtype = jnp.float32,
    precision: jax.lax.PrecisionLike = None,
    residual: Array | None = None,
    token_mask: Array | None = None,
) -> Array:
    """HyperExpert output of every token (dense placement), on one device.

    Args:
      hyper_inputs: one layer's slice of the generator output.
      x: <[T, d]>.
      expert_index: <int>[T, K] top-k before capacity (no gradient flows through it).
      residual: optional <[T, d]> added to the output (e.g. the MoE output).
      token_mask: optional <bool>[T]; tokens where it is False get 0 (before ``residual``).

    Returns:
      <[T, d]>.
    """
    expert_index = jax.lax.stop_gradient(expert_index)
    if "w_down" in hyper_inputs:
        if active_k is not None and expert_index.shape[-1] > 1:
            raise ValueError(
                "Per-set HyperExperts assume all K choices are active; for a traced active_k "
                "use the per-token form (HyperExpertsConfig(max_sets=0))."
            )
        adapters = {k: hyper_inputs[k] for k in experts.ADAPTER_KEYS}
        num_sets = math.comb(num_experts, expert_index.shape[-1])
        if adapters["w_down"].shape[0] != num_sets:
            raise ValueError(
                f"hyper_inputs hold {adapters['w_down'].shape[0]} adapters but C({num_experts}, "
                f"{expert_index.shape[-1]}) = {num_sets} sets are needed; build the generator "
                "with the layer's num_experts and num_selected."
            )
        ids = combination_ids(expert_index, num_experts)
        return grouped.grouped_adapter_mlp(adapters, x, ids, impl=impl, block_size=block_size,
                                           capacity_factor=capacity_factor, dtype=dtype,
                                           precision=precision, residual=residual,
                                           token_mask=token_mask)
    missing = sorted(set(PER_TOKEN_KEYS) - set(hyper_inputs))
    if missing:
        raise ValueError(f"hyper_inputs is neither per-set nor per-token; missing {missing}.")
    selected = selected_mask(expert_index, num_experts, active_k)
    out = per_token_hyper_experts(hyper_inputs, x, selected, dtype=dtype, precision=precision)
    return grouped.mask_and_add(out, residual, token_mask)
