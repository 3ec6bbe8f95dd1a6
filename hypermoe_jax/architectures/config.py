"""``TransformerConfig``: sizes and options of a T5-style encoder-decoder or decoder-only stack,
and the names of the variable collections and rng streams the architectures use.

Sparse layers: every ``sparse_step``-th block of a stack is sparse and uses
``TransformerConfig.moe`` (a ``layers.variants.MoeConfig``, shared by every MoE layer of both
stacks). Where the sparse blocks sit is ``sparse_placement``:

* ``last`` (default, T5X / flaxformer): blocks s-1, 2s-1, ... -- the last block of every period of
  s blocks; the number of layers must be a multiple of s;
* ``hf`` (Hugging Face ``SwitchTransformers``): blocks i with ``i % s == 1`` (every block when
  s = 1); any number of layers.

``stack_layout`` turns (layers, step, placement) into a ``StackLayout``: P periods of identical
blocks -- what ``nn.scan`` repeats -- and the tail of blocks left after the last whole period
(applied unscanned; only ``hf`` placement has one). ``sparse_step`` 0 / None: every block dense, a
period is one dense block.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax.layers import routers
from hypermoe_jax.layers.checkpoint_names import CHECKPOINT_NAMES
from hypermoe_jax.layers.variants import MoeConfig

# Remat policies (``TransformerConfig.remat_policy``, per scanned period). A policy is one preset
# or terms joined by ``+`` (the policy saves what any of its terms saves):
#
#   none            no remat: the backward keeps what it needs, nothing is recomputed
#   full            save nothing of the period, recompute it in the backward
#   dots            save every matmul output
#   dots_no_batch   save matmul outputs without batch dimensions (weight-stationary ones)
#   save:a,b        save the named intermediates a and b (``layers.checkpoint_names``)
#   recompute:a,b   save every named intermediate except a and b
#
# e.g. ``save:moe_dispatched,attention_out`` or ``dots_no_batch+save:moe_dispatched``.
RematPolicy = str
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")  # the presets
REMAT_NAMED_TERMS = ("save", "recompute")  # the ``<term>:<names>`` forms
# Where a stack's sparse blocks sit (``TransformerConfig.sparse_placement``).
SPARSE_PLACEMENTS = ("last", "hf")
# What padding tokens do (``TransformerConfig.padding_semantics``).
PADDING_SEMANTICS = ("t5x", "hf")

# Variable collections: ``params`` (trained), ``frozen`` (saved, never trained: HyperRouter's
# hypernetwork, SMoE-Dropout's router), ``cache`` (decoding; transient).
PARAMS = "params"
FROZEN = routers.FROZEN
CACHE = "cache"
INTERMEDIATES = "intermediates"
# Rng streams of a training forward pass.
DROPOUT = "dropout"
JITTER = routers.JITTER
RNG_STREAMS = (DROPOUT, JITTER)

# T5 v1.1 initialisers of dense kernels and token embeddings.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
default_embed_init = nn.initializers.normal(stddev=1.0)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of a T5-style transformer (encoder-decoder or decoder-only).

    ``encoder_sparse_step`` / ``decoder_sparse_step``: every s-th block of the stack is sparse;
    0 or None = all dense. ``sparse_placement``: ``last`` -- blocks s-1, 2s-1, ... (the number of
    layers must be a multiple of s) | ``hf`` -- blocks i with ``i % s == 1``, every block for s = 1
    (Hugging Face ``SwitchTransformers``; any number of layers).
    ``padding_semantics``: ``t5x`` -- padding (token id 0) is never routed to an expert, takes no
    capacity and counts in no router loss, and padded positions are masked as queries and keys |
    ``hf`` -- as Hugging Face: every position is routed like a real token (padding takes capacity
    and counts in the router losses) and only padded encoder keys are masked (decoder
    self-attention is causal only, unless segment ids are given).
    ``moe``: the MoE layers (their experts' unset ``hidden_dim`` / ``activation`` are taken from
    ``mlp_dim`` / ``activation``).
    ``remat_policy`` (per scanned period): ``none`` | ``full`` (save nothing, recompute the
    period in the backward pass) | ``dots`` (save matmul outputs) | ``dots_no_batch`` (save
    matmuls without batch dimensions, i.e. weight-stationary ones) | ``save:<names>`` (save these
    named intermediates, ``layers.checkpoint_names``) | ``recompute:<names>`` (save every named
    intermediate but these) | terms joined by ``+`` (see ``parse_remat_policy``).
    """

    vocab_size: int
    emb_dim: int = 512
    num_heads: int = 8
    head_dim: int = 64
    mlp_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    activation: str = "gated-gelu"
    dropout_rate: float = 0.1
    dropout_broadcast_dims: tuple[int, ...] = (-2,)
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    encoder_sparse_step: int | None = None
    decoder_sparse_step: int | None = None
    sparse_placement: str = "last"
    padding_semantics: str = "t5x"
    moe: MoeConfig | None = None
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"
    float32_attention_logits: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        parse_remat_policy(self.remat_policy)  # raises a ValueError that says what is wrong
        for name, value, options in (("sparse_placement", self.sparse_placement,
                                      SPARSE_PLACEMENTS),
                                     ("padding_semantics", self.padding_semantics,
                                      PADDING_SEMANTICS)):
            if value not in options:
                raise ValueError(f"TransformerConfig.{name} must be one of {options}, got "
                                 f"{value!r}{_did_you_mean(str(value), options)}.")
        stack_layout(self.num_encoder_layers, self.encoder_sparse_step, self.sparse_placement)
        stack_layout(self.num_decoder_layers, self.decoder_sparse_step, self.sparse_placement)
        if is_sparse(self.encoder_sparse_step) or is_sparse(self.decoder_sparse_step):
            if self.moe is None:
                raise ValueError(
                    "A sparse_step is set but TransformerConfig.moe is None; pass a MoeConfig "
                    "(or set encoder_sparse_step / decoder_sparse_step to 0 for a dense model)."
                )
        if self.moe is not None:
            object.__setattr__(self, "moe", self.moe.with_mlp_defaults(self.mlp_dim,
                                                                       self.activation))


def is_sparse(step: int | None) -> bool:
    return bool(step) and step > 0


@dataclasses.dataclass(frozen=True)
class StackLayout:
    """The blocks of a stack: ``periods`` repetitions of ``pattern`` (scanned), then ``tail``.

    ``pattern`` / ``tail``: one flag per block, True for a sparse (MoE) block; a pattern has at
    most one sparse block, so the MoE layers of the periods are numbered by period.
    """

    pattern: tuple[bool, ...]
    periods: int
    tail: tuple[bool, ...] = ()

    @property
    def blocks(self) -> tuple[bool, ...]:
        return self.pattern * self.periods + self.tail

    @property
    def sparse_indices(self) -> list[int]:
        """Block indices (0-based) of the MoE layers, in order."""
        return [i for i, sparse in enumerate(self.blocks) if sparse]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.blocks)

    @property
    def moe_layers_in_periods(self) -> int:
        return self.periods * sum(self.pattern)


def stack_layout(num_layers: int, sparse_step: int | None,
                 placement: str = "last") -> StackLayout:
    """The ``StackLayout`` of a stack of ``num_layers`` blocks with a sparse block every
    ``sparse_step`` (``placement``: ``last`` | ``hf``, see the module docstring)."""
    if not is_sparse(sparse_step):
        return StackLayout((False,), num_layers)
    s = sparse_step
    if placement == "hf":
        if s == 1:
            return StackLayout((True,), num_layers)
        pattern = (False, True) + (False,) * (s - 2)  # block i is sparse when i % s == 1
        periods = num_layers // s
        return StackLayout(pattern, periods, pattern[:num_layers - periods * s])
    if placement != "last":
        raise ValueError(f"Unknown sparse_placement {placement!r}; use one of "
                         f"{SPARSE_PLACEMENTS}.")
    if num_layers % s:
        raise ValueError(
            f"{num_layers} layers cannot be split into periods of sparse_step={s} "
            f"(sparse_step-1 dense blocks + 1 sparse block); choose a sparse_step that divides "
            f"the number of layers, or sparse_placement='hf' (blocks i % sparse_step == 1, any "
            f"number of layers)."
        )
    return StackLayout((False,) * (s - 1) + (True,), num_layers // s)


def num_periods(num_layers: int, sparse_step: int | None, placement: str = "last") -> int:
    """Scan length P of a stack."""
    return stack_layout(num_layers, sparse_step, placement).periods


def sparse_layer_indices(num_layers: int, sparse_step: int | None,
                         placement: str = "last") -> list[int]:
    """Block indices (0-based) of the MoE layers of a stack, in order."""
    return stack_layout(num_layers, sparse_step, placement).sparse_indices


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def parse_remat_policy(spec: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The terms of a remat policy: ``((kind, names), ...)``, kind a preset or one of
    ``REMAT_NAMED_TERMS`` (names empty for presets). ``none`` and ``full`` stand alone.

    Raises a ValueError naming the bad part and the choices, e.g. for ``save:mlp_hiden``.
    """
    usage = (f"a remat_policy is one of {REMAT_POLICIES} or terms joined by '+': 'dots', "
             "'dots_no_batch', 'save:<name>,<name>', 'recompute:<name>,<name>' with names from "
             f"{CHECKPOINT_NAMES}")
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"remat_policy must be a non-empty string, got {spec!r}; {usage}.")
    terms = []
    for term in spec.replace(" ", "").split("+"):
        kind, sep, rest = term.partition(":")
        if not sep:
            if kind not in REMAT_POLICIES:
                raise ValueError(f"Unknown remat_policy term {kind!r} in {spec!r}"
                                 f"{_did_you_mean(kind, REMAT_POLICIES + REMAT_NAMED_TERMS)}; "
                                 f"{usage}.")
            terms.append((kind, ()))
            continue
        if kind not in REMAT_NAMED_TERMS:
            raise ValueError(f"Unknown remat_policy term {kind + ':'!r} in {spec!r}"
                             f"{_did_you_mean(kind, REMAT_NAMED_TERMS)}; {usage}.")
        names = tuple(n for n in rest.split(",") if n)
        if not names:
            raise ValueError(f"remat_policy term {term!r} names no intermediate; {usage}.")
        for n in names:
            if n not in CHECKPOINT_NAMES:
                raise ValueError(f"Unknown intermediate {n!r} in remat_policy {spec!r}"
                                 f"{_did_you_mean(n, CHECKPOINT_NAMES)}; the named "
                                 f"intermediates are {CHECKPOINT_NAMES}.")
        terms.append((kind, names))
    if len(terms) > 1 and any(k in ("none", "full") for k, _ in terms):
        raise ValueError(f"remat_policy {spec!r}: 'none' and 'full' cannot be combined with other "
                         f"terms; {usage}.")
    return tuple(terms)
