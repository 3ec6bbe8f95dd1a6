"""Model size factories (T5 v1.1 dims) for the transformer configs that gin files reference.

    transformer.EncoderDecoder.config = @configs.switch_base_8()
    transformer.EncoderDecoder.config = @configs.sparse_t5()   # with configs.sparse_t5.* bindings

Sizes (T5 v1.1; d_kv = 64 except tiny):

    name   d     ff    heads  layers (enc + dec)
    tiny   64    128   4      4 + 4      (d_kv 16; tests, quickstarts)
    small  512   1024  6      8 + 8
    base   768   2048  12     12 + 12
    large  1024  2816  16     24 + 24

Decoder-only LM sizes (``decoder_only``; the encoder fields are unused):

    lm_tiny   128  256   4 (d_kv 32)  4     (the CPU quickstart)
    lm_small  256  512   8            4     (HyperRouter's / SMoE-Dropout's Transformer-XL base
                                             on enwik8 / text8 / WikiText-103: 4 layers, every
                                             layer an MoE of 16 experts)

Sparse models put an MoE layer in every ``sparse_step``-th block (2 = every other block, as
Switch), encoder and decoder. ``*_base_8`` use tied input/output embeddings: that is the
google/switch-base-8 checkpoint's arrangement (HF ``tie_word_embeddings=True``, logits scaled by
d^-0.5) and what its published ~620M parameter count includes; untied (T5 v1.1) adds one more
[vocab, d] matrix (+24.7M at base size).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax import transformer

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(emb_dim=64, mlp_dim=128, num_heads=4, head_dim=16, num_encoder_layers=4,
                 num_decoder_layers=4),
    "small": dict(emb_dim=512, mlp_dim=1024, num_heads=6, head_dim=64, num_encoder_layers=8,
                  num_decoder_layers=8),
    "base": dict(emb_dim=768, mlp_dim=2048, num_heads=12, head_dim=64, num_encoder_layers=12,
                 num_decoder_layers=12),
    "large": dict(emb_dim=1024, mlp_dim=2816, num_heads=16, head_dim=64, num_encoder_layers=24,
                  num_decoder_layers=24),
    "lm_tiny": dict(emb_dim=128, mlp_dim=256, num_heads=4, head_dim=32, num_encoder_layers=0,
                    num_decoder_layers=4),
    "lm_small": dict(emb_dim=256, mlp_dim=512, num_heads=8, head_dim=64, num_encoder_layers=0,
                     num_decoder_layers=4),
}
T5_VOCAB_SIZE = 32128  # the T5 SentencePiece vocabulary (32000) padded to a multiple of 128


def _dtype(dtype: Any) -> Any:
    return jnp.dtype(dtype) if isinstance(dtype, str) else dtype


def t5_1_1(
    size: str = "base",
    *,
    vocab_size: int = T5_VOCAB_SIZE,
    dropout_rate: float = 0.1,
    logits_via_embedding: bool = False,
    scan_layers: bool = True,
    remat_policy: str = "none",
    dtype: Any = "float32",
    **overrides: Any,
) -> transformer.TransformerConfig:
    """A dense T5 v1.1 config (untied embeddings, gated-GELU)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    fields = dict(SIZES[size])
    fields.update(overrides)
    return transformer.TransformerConfig(
        vocab_size=vocab_size,
        dropout_rate=dropout_rate,
        logits_via_embedding=logits_via_embedding,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        dtype=_dtype(dtype),
        **fields,
    )


def moe(variant: str = "switch", num_experts: int = 8, **overrides: Any) -> transformer.MoeConfig:
    """An MoE config for ``variant`` (switch, hypermoe, hyperrouter, smoe_dropout, moe_share)."""
    return transformer.MoeConfig(variant=variant, num_experts=num_experts, **overrides)


def moe_overrides(
    *,
    jitter_noise: float = 0.0,
    train_capacity_factor: float = 1.25,
    eval_capacity_factor: float = 2.0,
    options: dict[str, Any] | None = None,
    hyper_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``MoeConfig`` keyword arguments from the model gins' macros (``options``: any other
    ``MoeConfig`` field; ``hyper_options``: ``MoeConfig.hyper_options``)."""
    options = dict(options or {})
    known = {f.name for f in dataclasses.fields(transformer.MoeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"Unknown MoE option(s) {unknown} in MOE_OPTIONS; MoeConfig fields are "
            f"{sorted(known - {'variant', 'num_experts', 'num_selected'})}. HyperMoE / "
            "HyperRouter / MoE-Share sizes go into HYPER_OPTIONS.")
    return dict(jitter_noise=jitter_noise, train_capacity_factor=train_capacity_factor,
                eval_capacity_factor=eval_capacity_factor,
                hyper_options=dict(hyper_options or {}), **options)


def sparse_t5(
    size: str = "base",
    variant: str = "switch",
    num_experts: int = 8,
    *,
    sparse_step: int = 2,
    num_selected: int = 1,
    tied_embeddings: bool = True,
    moe_overrides: dict[str, Any] | None = None,
    **t5_overrides: Any,
) -> transformer.TransformerConfig:
    """T5 v1.1 dims with an MoE layer in every ``sparse_step``-th block of both stacks."""
    t5_overrides.setdefault("logits_via_embedding", tied_embeddings)
    moe_cfg = moe(variant, num_experts, num_selected=num_selected, **dict(moe_overrides or {}))
    return t5_1_1(
        size, moe=moe_cfg, encoder_sparse_step=sparse_step, decoder_sparse_step=sparse_step,
        **t5_overrides,
    )


def switch_base_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("base", "switch", 8, **overrides)


def hypermoe_base_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("base", "hypermoe", 8, **overrides)


def hyperrouter_base_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("base", "hyperrouter", 8, **overrides)


def smoe_dropout_base_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("base", "smoe_dropout", 8, **overrides)


def moe_share_base_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("base", "moe_share", 8, **overrides)


def switch_small_8(**overrides: Any) -> transformer.TransformerConfig:
    return sparse_t5("small", "switch", 8, **overrides)


def sparse_tiny(variant: str = "switch", num_experts: int = 4, **overrides: Any):
    """A tiny sparse encoder-decoder (2 MoE layers per stack) for tests and quickstarts."""
    overrides.setdefault("vocab_size", 256)
    return sparse_t5("tiny", variant, num_experts, **overrides)


def decoder_only(
    size: str = "tiny",
    variant: str | None = "switch",
    num_experts: int = 4,
    *,
    sparse_step: int = 2,
    num_selected: int = 1,
    num_layers: int | None = None,
    moe_overrides: dict[str, Any] | None = None,
    **t5_overrides: Any,
) -> transformer.TransformerConfig:
    """A decoder-only LM config (``variant=None``: dense). Uses the decoder settings only."""
    fields = dict(SIZES[size])
    layers = num_layers or fields["num_decoder_layers"]
    t5_overrides.setdefault("num_decoder_layers", layers)
    t5_overrides.setdefault("num_encoder_layers", 0)
    t5_overrides.setdefault("vocab_size", 256)
    if variant is None:
        return t5_1_1(size, **t5_overrides)
    moe_cfg = moe(variant, num_experts, num_selected=num_selected, **dict(moe_overrides or {}))
    return t5_1_1(size, moe=moe_cfg, decoder_sparse_step=sparse_step, **t5_overrides)


# --------------------------------------------------------------------------------------------
# Parameter counts (no memory allocated)
# --------------------------------------------------------------------------------------------


def parameter_counts(config: transformer.TransformerConfig, *, decoder_only: bool = False,
                     length: int = 8, batch: int = 1) -> dict[str, int]:
    """Parameter counts of a config via ``jax.eval_shape``: ``{collection: count, 'total': n}``.

    ``params`` are the trainable weights, ``frozen`` the saved-but-fixed ones.
    """
    module = transformer.DecoderOnly(config) if decoder_only else transformer.EncoderDecoder(config)
    tokens = jnp.ones((batch, length), jnp.int32)
    args = (tokens, tokens) if decoder_only else (tokens, tokens, tokens)

    def init(rng):
        return module.init({"params": rng}, *args, enable_dropout=False)

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    shapes = nn.unbox(shapes)
    counts = {
        col: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        for col, tree in shapes.items()
        if col != transformer.CACHE
    }
    counts["total"] = sum(counts.values())
    return counts
