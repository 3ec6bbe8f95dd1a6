"""Architectures: T5 v1.1 / Switch encoder-decoders and decoder-only LMs built from ``layers``.

* ``config``          -- ``TransformerConfig`` (sizes, options, the stack's ``MoeConfig``),
  variable collection and rng stream names;
* ``attention``       -- relative position buckets, multi-head attention with a decoding cache,
  attention masks;
* ``embedding``       -- token embeddings and the (tied or untied) logits head;
* ``blocks``          -- RMSNorm, the dense MLP, one pre-norm block (dense or sparse MLP), the
  scanned period;
* ``stacks``          -- a stack under ``nn.scan`` (or unrolled) with its shared HyperMoE
  generator, remat, scanned <-> unrolled variable trees;
* ``encoder_decoder`` / ``decoder_only`` -- the two architectures;
* ``sizes``           -- size presets (tiny ... large, lm_tiny, lm_small) and parameter counts.

Every module returns its MoE side outputs (``MoeAux``) as values, so aux losses survive the scan.
"""

from hypermoe_jax.architectures.config import (
    CACHE,
    DROPOUT,
    FROZEN,
    INTERMEDIATES,
    JITTER,
    PARAMS,
    RNG_STREAMS,
    StackLayout,
    TransformerConfig,
    sparse_layer_indices,
    stack_layout,
)
from hypermoe_jax.architectures.decoder_only import DecoderOnly
from hypermoe_jax.architectures.encoder_decoder import EncoderDecoder

__all__ = [
    "CACHE", "DROPOUT", "FROZEN", "INTERMEDIATES", "JITTER", "PARAMS", "RNG_STREAMS",
    "DecoderOnly", "EncoderDecoder", "StackLayout", "TransformerConfig", "sparse_layer_indices",
    "stack_layout",
]
