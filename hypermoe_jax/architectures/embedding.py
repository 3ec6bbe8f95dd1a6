"""Token embeddings (shared by encoder and decoder) and the output logits head.

Logits come from an untied ``[d, vocab]`` projection (T5 v1.1: the ``logits_dense`` parameter of
the architecture) or from the embedding (tied; then scaled by d^-0.5, as google/switch-base-8).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax import partitioning as part
from hypermoe_jax.architectures.config import (
    TransformerConfig,
    default_embed_init,
    default_kernel_init,
)

Array = jax.Array


class Embed(nn.Module):
    """Token embeddings ``[vocab, d]``; ``attend`` gives tied logits (unscaled)."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    embedding_init: nn.initializers.Initializer = default_embed_init

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, (part.VOCAB, part.EMBED)),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: Array) -> Array:
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"Token ids must be integers, got {ids.dtype}.")
        x = jnp.take(self.embedding.astype(self.dtype), ids, axis=0)
        return part.with_logical_constraint(x, (part.BATCH, part.LENGTH, part.EMBED))

    def attend(self, query: Array) -> Array:
        """``[..., d] -> [..., vocab]`` with the embedding matrix."""
        embedding = self.embedding.astype(self.dtype)
        return jnp.einsum("...d,vd->...v", query.astype(self.dtype), embedding)


def output_kernel(module: nn.Module, cfg: TransformerConfig) -> Array | None:
    """The untied output projection ``logits_dense`` <[d, vocab]> of ``module`` (call in its
    ``setup``); None with tied embeddings."""
    if cfg.logits_via_embedding:
        return None
    return module.param(
        "logits_dense",
        nn.with_logical_partitioning(default_kernel_init, (part.EMBED, part.VOCAB)),
        (cfg.emb_dim, cfg.vocab_size),
        cfg.param_dtype,
    )


def logits_head(cfg: TransformerConfig, embedder: Embed, y: Array, kernel: Array | None) -> Array:
    """<[B, L, d]> -> float32 logits <[B, L, vocab]>."""
    if cfg.logits_via_embedding:
        logits = embedder.attend(y) / jnp.sqrt(jnp.asarray(y.shape[-1], cfg.dtype))
    else:
        logits = jnp.einsum("bld,dv->blv", y.astype(cfg.dtype), kernel.astype(cfg.dtype))
    logits = logits.astype(jnp.float32)
    return part.with_logical_constraint(logits, (part.BATCH, part.LENGTH, part.VOCAB))
