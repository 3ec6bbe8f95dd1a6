"""Token losses and the MoE aux losses of a model, as T5X computes them.

* ``cross_entropy_with_logits``: per-token cross entropy with label smoothing and the output
  z-loss;
* ``loss_normalizing_factor_and_weights``: T5X's loss normalising factors (a number, or
  ``NUM_REAL_TARGET_TOKENS`` / ``NUM_TOTAL_TARGET_TOKENS`` / ``AVERAGE_PER_SEQUENCE``);
* ``moe_losses_and_metrics``: the load-balance and router z-losses of all MoE layers averaged over
  layers (or pooled per stack and summed, as Hugging Face), and the per-layer routing metrics as
  ``moe/<stack>/layer_<i>/<name>``;
* ``as_clu_metrics``: metrics in the form upstream T5X trainers merge.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from hypermoe_jax.layers.moe_layer import MoeAux
from hypermoe_jax.layers.routing import balance_loss_from_statistics

Array = jax.Array
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"
NUM_TOTAL_TARGET_TOKENS = "NUM_TOTAL_TARGET_TOKENS"
AVERAGE_PER_SEQUENCE = "AVERAGE_PER_SEQUENCE"
SPECIAL_FACTORS = (NUM_REAL_TARGET_TOKENS, NUM_TOTAL_TARGET_TOKENS, AVERAGE_PER_SEQUENCE)


def cross_entropy_with_logits(
    logits: Array, targets: Array, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array]:
    """Per-token cross entropy with label smoothing and the output z-loss.

    Label smoothing puts ``1 - s`` on the target and ``s / (V - 1)`` on every other token; the
    entropy of that distribution is subtracted so a perfect prediction has loss 0. The z-loss
    ``z_loss * logsumexp(logits)^2`` keeps the softmax normaliser near 1.

    Returns ``(loss [..], z_loss_term [..])``, the loss already including the z term.
    """
    vocab = logits.shape[-1]
    logits = logits.astype(jnp.float32)
    confidence = 1.0 - label_smoothing
    low = label_smoothing / max(vocab - 1, 1)
    normalizer = -(
        confidence * np.log(confidence)
        + (vocab - 1) * low * np.log(low + 1e-20)
    ) if label_smoothing > 0 else 0.0
    onehot = jax.nn.one_hot(targets, vocab, dtype=jnp.float32)
    soft = onehot * confidence + (1.0 - onehot) * low
    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_softmax = logits - log_z[..., None]
    loss = -jnp.sum(soft * log_softmax, axis=-1) - normalizer
    z_term = z_loss * jnp.square(log_z)
    return loss + z_term, z_term


def loss_normalizing_factor_and_weights(
    factor: float | str | None, targets: Array, weights: Array
) -> tuple[float | Array | None, Array]:
    """Resolves a T5X-style loss normalising factor (None = sum over tokens). Special factors are
    strings or enum members with those names (T5X's ``SpecialLossNormalizingFactor``)."""
    factor = factor_name(factor)
    if factor is None or not isinstance(factor, str):
        return factor, weights
    if factor == NUM_REAL_TARGET_TOKENS:
        return jnp.sum(weights), weights
    if factor == NUM_TOTAL_TARGET_TOKENS:
        return float(np.prod(targets.shape)), weights
    if factor == AVERAGE_PER_SEQUENCE:
        per_seq = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
        return float(targets.shape[0]), weights / per_seq
    raise ValueError(
        f"Unknown loss_normalizing_factor {factor!r}; use None, a number or one of "
        f"{SPECIAL_FACTORS}."
    )


def factor_name(factor):
    name = getattr(factor, "name", None)
    return name if isinstance(name, str) and not isinstance(factor, str) else factor


ROUTER_LOSS_POOLINGS = ("layer_mean", "hf")


def _pooled_hf_losses(aux: Mapping[str, MoeAux | None],
                      sparse_steps: Mapping[str, int | None]) -> tuple[Array, Array]:
    """Hugging Face ``SwitchTransformers``' router losses: per stack, the load-balance loss of
    the statistics pooled over all its MoE layers (each sequence's tokens of every layer form one
    group) and the z-loss over all its layers' tokens; summed over the stacks. As HF does, a stack
    whose sparse step is 1 (every block sparse) adds no router loss."""
    lb = z = jnp.zeros((), jnp.float32)
    for stack, a in aux.items():
        if a is None or not (sparse_steps.get(stack) or 0) > 1:
            continue
        frac, prob, has_tokens = a.balance_stats  # [P, G, E], [P, G, E], [P, G]
        lb = lb + balance_loss_from_statistics(jnp.mean(frac, 0), jnp.mean(prob, 0),
                                               jnp.max(has_tokens, 0))
        z = z + jnp.mean(a.z_loss)
    return lb, z


def moe_losses_and_metrics(
    aux: Mapping[str, MoeAux | None],
    layer_indices: Mapping[str, list[int]],
    *,
    pooling: str = "layer_mean",
    sparse_steps: Mapping[str, int | None] | None = None,
) -> tuple[Array, Array, dict[str, Array]]:
    """The router losses of all MoE layers and the per-layer metrics.

    Args:
      aux: stack name -> ``MoeAux`` stacked over that stack's MoE layers ([P, ...]) or None.
      layer_indices: stack name -> block index of each MoE layer.
      pooling: ``layer_mean`` -- each loss averaged over all MoE layers of both stacks (T5X) |
        ``hf`` -- as Hugging Face: per stack, pooled over its layers, summed over the stacks
        (``_pooled_hf_losses``; needs ``sparse_steps``).
      sparse_steps: stack name -> sparse step (``hf`` pooling).

    Returns:
      ``(load_balance_loss, router_z_loss, metrics)``; the losses are 0 for a dense model.
    """
    if pooling not in ROUTER_LOSS_POOLINGS:
        raise ValueError(f"Unknown router loss pooling {pooling!r}; use one of "
                         f"{ROUTER_LOSS_POOLINGS}.")
    lbs, zs, metrics = [], [], {}
    for stack, a in aux.items():
        if a is None:
            continue
        lbs.append(a.load_balance_loss)
        zs.append(a.z_loss)
        for j, layer in enumerate(layer_indices[stack]):
            prefix = f"moe/{stack}/layer_{layer}/"
            for name, value in a.metrics.items():
                metrics[prefix + name] = value[j]
            metrics[prefix + "load_balance_loss"] = a.load_balance_loss[j]
            metrics[prefix + "router_z_loss"] = a.z_loss[j]
    if not lbs:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero, metrics
    if pooling == "hf":
        lb, z = _pooled_hf_losses(aux, sparse_steps or {})
    else:
        lb = jnp.mean(jnp.concatenate(lbs))
        z = jnp.mean(jnp.concatenate(zs))
    for name in ("dropped_fraction", "router_entropy", "router_confidence"):
        values = [v for k, v in metrics.items() if k.endswith("/" + name)]
        metrics[f"moe/{name}"] = jnp.mean(jnp.stack(values))
    return lb, z, metrics


def as_clu_metrics(metrics: Mapping[str, Array]) -> dict:
    """Metrics as ``clu.metrics.Average`` objects (vectors split into ``<name>/<i>`` scalars)."""
    from clu import metrics as clu_metrics_lib

    out = {}
    for name, value in metrics.items():
        value = jnp.asarray(value, jnp.float32)
        if value.ndim == 0:
            out[name] = clu_metrics_lib.Average.from_model_output(value)
        else:
            for i, v in enumerate(value.reshape(-1)):
                out[f"{name}/{i}"] = clu_metrics_lib.Average.from_model_output(v)
    return out
