"""Size presets (T5 v1.1 dims): the ``TransformerConfig`` factories that gin files reference.

    encoder_decoder.EncoderDecoder.config = @sizes.sparse_t5()   # with sizes.sparse_t5.* bindings
    sizes.sparse_t5.moe = @variants.moe_config()                 # the MoE layers (layers.variants)

Sizes (T5 v1.1; d_kv = 64 except tiny):

    name   d     ff    heads  layers (enc + dec)
    tiny   64    128   4      4 + 4      (d_kv 16; tests, quickstarts)
    small  512   1024  6      8 + 8
    base   768   2048  12     12 + 12
    large  1024  2816  16     24 + 24
    switch_base  768  3072  12  12 + 12  (ReLU: google/switch-base-8's dims; the *_base_8 presets)

Decoder-only LM sizes (``decoder_only``; the encoder fields are unused):

    lm_tiny   128  256   4 (d_kv 32)  4     (the CPU quickstart)
    lm_small  256  512   8            4     (HyperRouter's / SMoE-Dropout's Transformer-XL base
                                             on enwik8 / text8 / WikiText-103: 4 layers, every
                                             layer an MoE of 16 experts)

Sparse models put an MoE layer (``moe``: a ``layers.variants.MoeConfig``) in every
``sparse_step``-th block (2 = every other block, as Switch), encoder and decoder. ``*_base_8``
use tied input/output embeddings: that is the google/switch-base-8 checkpoint's arrangement
(HF ``tie_word_embeddings=True``, logits scaled by d^-0.5) and what its published ~620M parameter
count includes; untied (T5 v1.1) adds one more [vocab, d] matrix (+24.7M at base size).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax.architectures.config import CACHE, TransformerConfig
from hypermoe_jax.architectures.decoder_only import DecoderOnly
from hypermoe_jax.architectures.encoder_decoder import EncoderDecoder
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.variants import MoeConfig, moe_config

SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(emb_dim=64, mlp_dim=128, num_heads=4, head_dim=16, num_encoder_layers=4,
                 num_decoder_layers=4),
    "small": dict(emb_dim=512, mlp_dim=1024, num_heads=6, head_dim=64, num_encoder_layers=8,
                  num_decoder_layers=8),
    "base": dict(emb_dim=768, mlp_dim=2048, num_heads=12, head_dim=64, num_encoder_layers=12,
                 num_decoder_layers=12),
    "large": dict(emb_dim=1024, mlp_dim=2816, num_heads=16, head_dim=64, num_encoder_layers=24,
                  num_decoder_layers=24),
    # google/switch-base-8's published dims (the original T5 base: ReLU, not gated).
    "switch_base": dict(emb_dim=768, mlp_dim=3072, num_heads=12, head_dim=64,
                        num_encoder_layers=12, num_decoder_layers=12, activation="relu"),
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
) -> TransformerConfig:
    """A dense T5 v1.1 config (untied embeddings, gated-GELU)."""
    if size not in SIZES:
        raise ValueError(f"Unknown size {size!r}; choose one of {sorted(SIZES)}.")
    fields = dict(SIZES[size])
    fields.update(overrides)
    return TransformerConfig(
        vocab_size=vocab_size,
        dropout_rate=dropout_rate,
        logits_via_embedding=logits_via_embedding,
        scan_layers=scan_layers,
        remat_policy=remat_policy,
        dtype=_dtype(dtype),
        **fields,
    )


def sparse_t5(
    size: str = "base",
    moe: MoeConfig | None = None,
    *,
    sparse_step: int = 2,
    tied_embeddings: bool = True,
    encoder_sparse_step: int | None = None,
    decoder_sparse_step: int | None = None,
    **t5_overrides: Any,
) -> TransformerConfig:
    """T5 v1.1 dims with an MoE layer (``moe``; default: Switch, 8 experts) in every
    ``sparse_step``-th block of both stacks (``encoder_sparse_step`` / ``decoder_sparse_step``:
    one stack's own step; 0 = all dense)."""
    t5_overrides.setdefault("logits_via_embedding", tied_embeddings)
    return t5_1_1(
        size, moe=moe or moe_config("switch"),
        encoder_sparse_step=sparse_step if encoder_sparse_step is None else encoder_sparse_step,
        decoder_sparse_step=sparse_step if decoder_sparse_step is None else decoder_sparse_step,
        **t5_overrides,
    )


def _variant(variant: str, num_experts: int) -> MoeConfig:
    return moe_config(variant, experts=ExpertsConfig(num_experts=num_experts))


def switch_base_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("switch_base", _variant("switch", 8), **overrides)


def hypermoe_base_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("switch_base", _variant("hypermoe", 8), **overrides)


def hyperrouter_base_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("switch_base", _variant("hyperrouter", 8), **overrides)


def smoe_dropout_base_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("switch_base", _variant("smoe_dropout", 8), **overrides)


def moe_share_base_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("switch_base", _variant("moe_share", 8), **overrides)


def switch_small_8(**overrides: Any) -> TransformerConfig:
    return sparse_t5("small", _variant("switch", 8), **overrides)


def decoder_only(
    size: str = "tiny",
    moe: MoeConfig | None = None,
    *,
    sparse_step: int = 2,
    num_layers: int | None = None,
    **t5_overrides: Any,
) -> TransformerConfig:
    """A decoder-only LM config with an MoE layer (``moe``; None: dense) in every
    ``sparse_step``-th block. Uses the decoder settings only."""
    fields = dict(SIZES[size])
    layers = num_layers or fields["num_decoder_layers"]
    t5_overrides.setdefault("num_decoder_layers", layers)
    t5_overrides.setdefault("num_encoder_layers", 0)
    t5_overrides.setdefault("vocab_size", 256)
    if moe is None:
        return t5_1_1(size, **t5_overrides)
    return t5_1_1(size, moe=moe, decoder_sparse_step=sparse_step, **t5_overrides)


# --------------------------------------------------------------------------------------------
# Parameter counts (no memory allocated)
# --------------------------------------------------------------------------------------------


def parameter_counts(config: TransformerConfig, *, decoder_only: bool = False,
                     length: int = 8, batch: int = 1) -> dict[str, int]:
    """Parameter counts of a config via ``jax.eval_shape``: ``{collection: count, 'total': n}``.

    ``params`` are the trainable weights, ``frozen`` the saved-but-fixed ones.
    """
    module = DecoderOnly(config) if decoder_only else EncoderDecoder(config)
    tokens = jnp.ones((batch, length), jnp.int32)
    args = (tokens, tokens) if decoder_only else (tokens, tokens, tokens)

    def init(rng):
        return module.init({"params": rng}, *args, enable_dropout=False)

    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    shapes = nn.unbox(shapes)
    counts = {
        col: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
        for col, tree in shapes.items()
        if col != CACHE
    }
    counts["total"] = sum(counts.values())
    return counts
