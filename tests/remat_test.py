"""Remat policies by name: a policy saves the named intermediates it names (read from the residuals
``jax.checkpoint`` keeps for the backward pass) and recomputes the rest; gradients do not change.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax._src.ad_checkpoint import saved_residuals

from hypermoe_jax import architectures as arch
from hypermoe_jax.architectures import config as arch_config
from hypermoe_jax.architectures import sizes, stacks
from hypermoe_jax.architectures.decoder_only import DecoderOnly
from hypermoe_jax.layers import checkpoint_names as names
from hypermoe_jax.layers import variants
from hypermoe_jax.layers.experts import ExpertsConfig

TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 256, (2, 16)), jnp.int32)


def _model(policy, scan_layers=False):
    moe = variants.moe_config("switch", experts=ExpertsConfig(num_experts=4))
    cfg = sizes.decoder_only("lm_tiny", moe, num_layers=2, scan_layers=scan_layers,
                             remat_policy=policy, dropout_rate=0.0)
    return DecoderOnly(cfg)


@functools.cache
def _params():
    init = jax.jit(functools.partial(_model("none").init, enable_dropout=False))
    return nn.unbox(init(jax.random.key(0), TOKENS, TOKENS)["params"])


def _loss(model):
    def loss(params):
        logits, _ = model.apply({"params": params}, TOKENS, TOKENS, enable_dropout=False)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return loss


def _saved(policy, scan_layers=False):
    """The residuals of the backward pass: ``[(shape, name or None), ...]``."""
    params = _params()
    if scan_layers:
        params = stacks.stack_layers(params)
    out = []
    for aval, desc in saved_residuals(_loss(_model(policy, scan_layers)), params):
        name = desc.split("named '")[1].split("'")[0] if "named '" in desc else None
        out.append((tuple(aval.shape), name))
    return out


def _named(saved):
    return sorted(n for _, n in saved if n is not None)


def test_policy_saves_exactly_the_names_it_names():
    full = _saved("full")
    assert _named(full) == []
    saved = _saved("save:mlp_hidden,moe_dispatched")
    # One dense block (mlp_hidden) and one MoE block (moe_dispatched): one of each, and the rest
    # of the period is recomputed, as with `full`.
    assert _named(saved) == [names.MLP_HIDDEN, names.MOE_DISPATCHED]
    assert len(saved) == len(full) + 2
    shapes = dict((n, s) for s, n in saved if n)
    assert shapes[names.MLP_HIDDEN] == (2, 16, 256)  # [B, L, f]
    assert shapes[names.MOE_DISPATCHED][-1] == 128  # [E, G, C, d]

    # recompute:<names> keeps every other named intermediate.
    kept = set(_named(_saved("recompute:mlp_hidden,attention_qkv")))
    assert names.MLP_HIDDEN not in kept and names.ATTENTION_QKV not in kept
    assert {names.MOE_DISPATCHED, names.MOE_EXPERT_HIDDEN, names.ATTENTION_OUT} <= kept
    # A union with dots keeps the named ones and the matmul outputs.
    both = _saved("dots_no_batch+save:moe_expert_hidden")
    assert names.MOE_EXPERT_HIDDEN in _named(both) and len(both) > len(full) + 1


def test_scanned_stack_saves_the_named_intermediates_per_layer():
    """Under nn.scan the residuals are stacked over the periods (leading axis P = 1 here) and
    lose their names: the policy's residuals are full's plus one per named intermediate."""
    full = _saved("full", scan_layers=True)
    saved = _saved("save:mlp_hidden,moe_dispatched", scan_layers=True)
    extra = sorted(set(saved) - set(full))
    assert len(saved) == len(full) + 2
    assert ((1, 2, 16, 256), None) in extra  # mlp_hidden [P, B, L, f]


@functools.cache
def _reference_grads():
    return jax.jit(jax.grad(_loss(_model("none"))))(_params())


def test_gradients_do_not_depend_on_the_policy():
    policy = "dots_no_batch+save:mlp_hidden,moe_dispatched"
    params = _params()
    ref = _reference_grads()
    grads = jax.jit(jax.grad(_loss(_model(policy))))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 1e-3


def test_presets_keep_working():
    for preset in arch_config.REMAT_POLICIES:
        arch.TransformerConfig(vocab_size=8, remat_policy=preset)
    assert stacks.remat_policy("full") is None
    assert stacks.remat_policy("dots") is jax.checkpoint_policies.checkpoint_dots


@pytest.mark.parametrize("spec,match", [
    ("dotz", r"Unknown remat_policy term 'dotz' .*did you mean 'dots'"),
    ("save:mlp_hiden", r"Unknown intermediate 'mlp_hiden' .*did you mean 'mlp_hidden'"),
    ("keep:mlp_hidden", r"Unknown remat_policy term 'keep:'"),
    ("save:", r"names no intermediate"),
    ("full+save:mlp_hidden", r"cannot be combined"),
    ("", r"non-empty string"),
])
def test_bad_policies_say_what_is_wrong(spec, match):
    with pytest.raises(ValueError, match=match):
        arch.TransformerConfig(vocab_size=8, remat_policy=spec)
