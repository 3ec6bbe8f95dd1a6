"""Decoder-only LM / prefix LM: T5-style blocks without cross-attention.

Uses ``num_decoder_layers`` and ``decoder_sparse_step`` of the ``TransformerConfig``.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax.architectures.attention import decoder_self_mask
from hypermoe_jax.architectures.config import TransformerConfig
from hypermoe_jax.architectures.embedding import Embed, logits_head, output_kernel
from hypermoe_jax.architectures.stacks import TransformerStack


class DecoderOnly(nn.Module):
    """Decoder-only LM (T5-style blocks without cross-attention); uses ``num_decoder_layers`` and
    ``decoder_sparse_step``. ``decoder_causal_attention`` (prefix LM) makes the prefix
    bidirectional. Returns ``(logits, {'decoder': MoeAux|None})``."""

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.param_dtype)
        self.decoder = TransformerStack(
            cfg, cfg.num_decoder_layers, cfg.decoder_sparse_step, causal=True
        )
        self.logits_dense = output_kernel(self, cfg)

    def __call__(self, decoder_input_tokens, decoder_target_tokens=None, decoder_segment_ids=None,
                 decoder_positions=None, decoder_causal_attention=None, *,
                 enable_dropout: bool = True, decode: bool = False, active_k=None):
        if decode:
            self_mask, padding_mask = None, None
        else:
            targets = decoder_target_tokens
            if targets is None:
                targets = decoder_input_tokens
            valid = targets > 0
            if self.config.padding_semantics == "hf":  # causal only, every position routed
                valid = jnp.ones_like(valid)
            self_mask = decoder_self_mask(valid, decoder_segment_ids, decoder_causal_attention)
            padding_mask = valid if decoder_segment_ids is None else decoder_segment_ids > 0
            if self.config.padding_semantics == "hf":
                padding_mask = None
        y = self.token_embedder(decoder_input_tokens)
        y, aux = self.decoder(
            y, self_mask=self_mask, positions=decoder_positions, padding_mask=padding_mask,
            deterministic=not enable_dropout, decode=decode, active_k=active_k,
        )
        return logits_head(self.config, self.token_embedder, y, self.logits_dense), {"decoder": aux}
