"""Shared pieces of the task modules: idempotent registration, vocabularies, output features."""

from __future__ import annotations

from collections.abc import Sequence

import seqio

from hypermoe_jax.data import vocab as vocab_lib

# Every name registered by this package, in registration order.
TASK_NAMES: list[str] = []
MIXTURE_NAMES: list[str] = []

T5_VOCAB = vocab_lib.t5_vocabulary()
BYTE_VOCAB = vocab_lib.byte_vocabulary()


def offline_vocab() -> seqio.Vocabulary:
    return vocab_lib.offline_vocabulary()


def text_to_text_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    return {
        "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
        "targets": seqio.Feature(vocabulary, add_eos=True),
    }


def lm_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """Decoder-only LM: ``targets`` only; pieces of a token stream carry no EOS of their own."""
    return {"targets": seqio.Feature(vocabulary, add_eos=False)}


def add_task(name: str, **kwargs) -> seqio.Task:
    """``seqio.TaskRegistry.add`` that replaces an earlier registration of ``name`` (so importing
    or reloading a task module twice never fails with "already registered")."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    task = seqio.TaskRegistry.add(name, **kwargs)
    if name not in TASK_NAMES:
        TASK_NAMES.append(name)
    return task


def add_mixture(name: str, tasks: Sequence[tuple[str, float]] | Sequence[str],
                default_rate: float | None = None) -> seqio.Mixture:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    mixture = seqio.MixtureRegistry.add(name, list(tasks), default_rate=default_rate)
    if name not in MIXTURE_NAMES:
        MIXTURE_NAMES.append(name)
    return mixture
