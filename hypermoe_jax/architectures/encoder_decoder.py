"""T5 v1.1 / Switch encoder-decoder.

Token embeddings shared by encoder and decoder, an encoder stack (bidirectional) and a decoder
stack (causal, with cross-attention), each with its MoE layers every ``sparse_step`` blocks.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax.architectures.attention import attention_mask, decoder_self_mask
from hypermoe_jax.architectures.config import TransformerConfig
from hypermoe_jax.architectures.embedding import Embed, logits_head, output_kernel
from hypermoe_jax.architectures.stacks import TransformerStack


class EncoderDecoder(nn.Module):
    """T5 v1.1 / Switch encoder-decoder.

    ``__call__`` returns ``(logits <float32>[B, L, vocab], {'encoder': MoeAux|None,
    'decoder': MoeAux|None})``. ``enable_dropout=False`` is eval mode (also: no jitter, eval
    capacity factor). ``active_k``: traced number of experts per token (SMoE-Dropout).
    """

    config: TransformerConfig

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, cfg.dtype, cfg.param_dtype)
        self.encoder = TransformerStack(
            cfg, cfg.num_encoder_layers, cfg.encoder_sparse_step, causal=False
        )
        self.decoder = TransformerStack(
            cfg, cfg.num_decoder_layers, cfg.decoder_sparse_step, causal=True,
            cross_attention=True,
        )
        self.logits_dense = output_kernel(self, cfg)

    def encode(self, encoder_input_tokens, encoder_segment_ids=None, encoder_positions=None, *,
               enable_dropout: bool = True, active_k=None):
        hf = self.config.padding_semantics == "hf"
        valid = encoder_input_tokens > 0
        # HF padding semantics: padded positions are queries and routed tokens like real ones.
        queries = jnp.ones_like(valid) if hf else valid
        mask = attention_mask(queries, valid, encoder_segment_ids, encoder_segment_ids)
        x = self.token_embedder(encoder_input_tokens)
        return self.encoder(
            x, self_mask=mask, positions=encoder_positions, padding_mask=None if hf else valid,
            deterministic=not enable_dropout, active_k=active_k,
        )

    def decode(self, encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
               encoder_segment_ids=None, decoder_segment_ids=None, decoder_positions=None, *,
               enable_dropout: bool = True, decode: bool = False, active_k=None):
        hf = self.config.padding_semantics == "hf"
        enc_valid = encoder_input_tokens > 0
        if decode:
            self_mask = None
            dec_valid = jnp.ones(decoder_input_tokens.shape, bool)
            cross_mask = attention_mask(dec_valid, enc_valid)
            padding_mask = None
        else:
            dec_valid = decoder_target_tokens > 0
            if hf:  # causal only; padded positions are routed like real tokens
                dec_valid = jnp.ones_like(dec_valid)
            self_mask = decoder_self_mask(dec_valid, decoder_segment_ids)
            cross_mask = attention_mask(
                dec_valid, enc_valid, decoder_segment_ids, encoder_segment_ids
            )
            padding_mask = dec_valid if decoder_segment_ids is None else decoder_segment_ids > 0
            if hf:
                padding_mask = None
        y = self.token_embedder(decoder_input_tokens)
        y, aux = self.decoder(
            y, self_mask=self_mask, positions=decoder_positions, encoded=encoded,
            cross_mask=cross_mask, padding_mask=padding_mask, deterministic=not enable_dropout,
            decode=decode, active_k=active_k,
        )
        return logits_head(self.config, self.token_embedder, y, self.logits_dense), aux

    def __call__(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                 encoder_segment_ids=None, decoder_segment_ids=None, encoder_positions=None,
                 decoder_positions=None, *, enable_dropout: bool = True, decode: bool = False,
                 active_k=None):
        encoded, enc_aux = self.encode(
            encoder_input_tokens, encoder_segment_ids, encoder_positions,
            enable_dropout=enable_dropout, active_k=active_k,
        )
        logits, dec_aux = self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
            encoder_segment_ids, decoder_segment_ids, decoder_positions,
            enable_dropout=enable_dropout, decode=decode, active_k=active_k,
        )
        return logits, {"encoder": enc_aux, "decoder": dec_aux}
