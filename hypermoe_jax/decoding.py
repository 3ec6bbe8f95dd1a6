"""Autoregressive decoding: greedy, temperature / top-k sampling and beam search.

The decoders are model-agnostic. They call ``tokens_to_logits(state) -> (logits, new_cache)``
once per position, where ``state`` is a ``DecodingState``; ``logits`` <float32>[N, V] are the
next-token logits of each of the N = batch * num_decodes rows. ``cache`` is any pytree (e.g. the
flax ``cache`` collection); every leaf with at least one dimension has the batch on axis 0 (the
transformer stacks its scanned layers' caches on axis 1 for that reason), scalars are shared.

Tokens: ``sequences`` are target-aligned: position i holds the i-th output token, and the token
fed to the model at step i is the previous output (0 = BOS at step 0). ``prompt`` <int>[B, L]
(target-aligned, 0 = free) forces the output at its nonzero positions (decoder-only prompts,
constrained decoding); forced tokens add nothing to the log probability and never end a
sequence. After EOS a sequence is padded with 0.

Beam search uses the length penalty of GNMT / T5: ``score = log_prob / ((5 + length) / 6)^alpha``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
NEG_INF = -1.0e7


@struct.dataclass
class DecodingState:
    """What ``tokens_to_logits`` sees at step ``cur_index``.

    Attributes:
      cur_index: <int32>[] the position whose token is being predicted.
      sequences: <int32>[N, L] outputs so far (positions >= cur_index are 0).
      cur_token: <int32>[N, 1] the input token of this step (previous output, or 0 at step 0).
      cache: the model's decoding cache.
    """

    cur_index: Array
    sequences: Array
    cur_token: Array
    cache: Any


TokensToLogits = Callable[[DecodingState], tuple[Array, Any]]


# --------------------------------------------------------------------------------------------
# Batch <-> batch * beams
# --------------------------------------------------------------------------------------------


def flat_batch_beam_expand(x: Array, beam_size: int) -> Array:
    """[B, ...] -> [B * beam_size, ...] (each row repeated ``beam_size`` times, adjacent)."""
    return jnp.repeat(x, beam_size, axis=0)


def cache_map(fn: Callable[[Array], Array], cache: Any) -> Any:
    """Applies ``fn`` to the cache leaves that have a batch axis (ndim >= 1)."""
    return jax.tree.map(lambda x: fn(x) if jnp.ndim(x) >= 1 else x, cache)


def _gather_beams(x: Array, beam_indices: Array, batch: int, beam: int) -> Array:
    """x: [B * K_old, ...]; beam_indices: [B, K_new] -> [B * K_new, ...]."""
    x = x.reshape(batch, -1, *x.shape[1:])
    idx = beam_indices.reshape(*beam_indices.shape, *([1] * (x.ndim - 2)))
    out = jnp.take_along_axis(x, idx, axis=1)
    return out.reshape(batch * beam_indices.shape[1], *x.shape[2:])


def _gather_beams_2d(x: Array, beam_indices: Array) -> Array:
    """x: [B, K_old, ...]; beam_indices: [B, K_new] -> [B, K_new, ...]."""
    idx = beam_indices.reshape(*beam_indices.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, idx, axis=1)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _input_token(sequences: Array, i: Array) -> Array:
    prev = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(i - 1, 0), 1, axis=1)
    return jnp.where(i > 0, prev, 0).astype(jnp.int32)


def temperature_sample(
    prompt: Array,
    cache: Any,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    rng: Array | None = None,
    num_decodes: int = 1,
    temperature: float = 1.0,
    topk: int = 0,
) -> tuple[Array, Array]:
    """Samples ``num_decodes`` continuations per example; ``temperature=0`` is greedy.

    Args:
      prompt: <int32>[B, L] forced tokens (0 = sample); L is the decode length.
      cache: the decoding cache for batch B (expanded here to B * num_decodes).
      tokens_to_logits: see module docstring (rows are example-major: row b * nd + j).
      eos_id: the end-of-sequence token.
      rng: PRNG key (required unless greedy).
      temperature: softmax temperature (static); 0 = argmax.
      topk: sample only among the k most likely tokens (0 = all).

    Returns:
      ``(sequences <int32>[B, num_decodes, L], log_probs <float32>[B, num_decodes])``; the log
      probability of the sampled (unforced) tokens under the untempered model.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("temperature sampling needs an rng (or use temperature=0 for greedy).")
    batch, length = prompt.shape
    n = batch * num_decodes
    prompt = flat_batch_beam_expand(prompt.astype(jnp.int32), num_decodes)
    cache = cache_map(lambda x: flat_batch_beam_expand(x, num_decodes), cache)
    rng = jax.random.PRNGKey(0) if rng is None else rng

    def cond(carry):
        i, _, _, ended, _, _ = carry
        return (i < length) & ~jnp.all(ended)

    def body(carry):
        i, sequences, cache, ended, log_prob, rng = carry
        state = DecodingState(i, sequences, _input_token(sequences, i), cache)
        logits, cache = tokens_to_logits(state)
        logits = logits.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        if greedy:
            next_token = jnp.argmax(logits, axis=-1)
        else:
            rng, step_rng = jax.random.split(rng)
            scaled = logits / temperature
            if topk:
                kth = jax.lax.top_k(scaled, topk)[0][:, -1:]
                scaled = jnp.where(scaled < kth, NEG_INF, scaled)
            next_token = jax.random.categorical(step_rng, scaled, axis=-1)
        forced = jax.lax.dynamic_slice_in_dim(prompt, i, 1, axis=1)[:, 0]
        is_forced = forced > 0
        next_token = jnp.where(is_forced, forced, next_token)
        next_token = jnp.where(ended, 0, next_token).astype(jnp.int32)
        token_lp = jnp.take_along_axis(log_probs, next_token[:, None], axis=-1)[:, 0]
        log_prob = log_prob + jnp.where(is_forced | ended, 0.0, token_lp)
        sequences = jax.lax.dynamic_update_slice_in_dim(sequences, next_token[:, None], i, axis=1)
        ended = ended | ((next_token == eos_id) & ~is_forced)
        return i + 1, sequences, cache, ended, log_prob, rng

    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((n, length), jnp.int32),
        cache,
        jnp.zeros((n,), bool),
        jnp.zeros((n,), jnp.float32),
        rng,
    )
    _, sequences, _, _, log_prob, _ = jax.lax.while_loop(cond, body, init)
    return sequences.reshape(batch, num_decodes, length), log_prob.reshape(batch, num_decodes)


def greedy(prompt: Array, cache: Any, tokens_to_logits: TokensToLogits, *, eos_id: int):
    """Greedy decoding: ``(sequences <int32>[B, L], log_probs <float32>[B])``."""
    seqs, lp = temperature_sample(prompt, cache, tokens_to_logits, eos_id=eos_id, temperature=0.0)
    return seqs[:, 0], lp[:, 0]


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------


def brevity_penalty(alpha: float, length: Array) -> Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha``."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


def beam_search(
    prompt: Array,
    cache: Any,
    tokens_to_logits: TokensToLogits,
    *,
    eos_id: int,
    beam_size: int = 4,
    alpha: float = 0.6,
) -> tuple[Array, Array]:
    """Beam search with a length penalty.

    Args:
      prompt: <int32>[B, L] forced tokens (0 = search); L is the decode length.
      cache: the decoding cache for batch B (expanded here to B * beam_size).
      beam_size: K.
      alpha: length penalty exponent (0 = raw log probability).

    Returns:
      ``(sequences <int32>[B, K, L], scores <float32>[B, K])``, sorted by ascending score (the
      best is ``[:, -1]``, as T5X returns them). Examples with no finished beam return their
      alive beams scored at full length.
    """
    batch, length = prompt.shape
    k = beam_size
    prompt = prompt.astype(jnp.int32)
    cache = cache_map(lambda x: flat_batch_beam_expand(x, k), cache)

    def cond(carry):
        i, _, alive_lp, _, fin_scores, fin_flags, _ = carry
        # Stop once no alive beam can beat the worst finished one (log probs only decrease; the
        # penalty is largest at full length).
        best_alive = alive_lp[:, 0] / brevity_penalty(alpha, length)
        worst_fin = jnp.min(jnp.where(fin_flags, fin_scores, NEG_INF), axis=1)
        done = jnp.all(fin_flags, axis=1) & (worst_fin > best_alive)
        return (i < length) & ~jnp.all(done)

    def body(carry):
        i, alive_seqs, alive_lp, fin_seqs, fin_scores, fin_flags, cache = carry
        flat_seqs = alive_seqs.reshape(batch * k, length)
        state = DecodingState(i, flat_seqs, _input_token(flat_seqs, i), cache)
        logits, cache = tokens_to_logits(state)
        vocab = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        log_probs = log_probs.reshape(batch, k, vocab)
        forced = jax.lax.dynamic_slice_in_dim(prompt, i, 1, axis=1)  # [B, 1]
        is_forced = forced[:, 0] > 0
        forced_lp = jnp.where(jnp.arange(vocab) == forced[:, :, None], 0.0, NEG_INF)
        log_probs = jnp.where(is_forced[:, None, None], forced_lp, log_probs)

        # [B, K * V] -> the 2K best continuations (enough to keep K alive after EOS).
        cand = (alive_lp[:, :, None] + log_probs).reshape(batch, k * vocab)
        top_lp, top_idx = jax.lax.top_k(cand, 2 * k)
        top_beam = top_idx // vocab
        top_tok = (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather_beams_2d(alive_seqs, top_beam)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, top_tok[:, :, None], i, axis=2)
        top_eos = (top_tok == eos_id) & ~is_forced[:, None]

        # Alive: the K best that did not end.
        alive_cand = jnp.where(top_eos, NEG_INF, top_lp)
        new_alive_lp, alive_pos = jax.lax.top_k(alive_cand, k)
        new_alive_seqs = _gather_beams_2d(top_seqs, alive_pos)
        src_beam = jnp.take_along_axis(top_beam, alive_pos, axis=1)
        cache = cache_map(lambda x: _gather_beams(x, src_beam, batch, k), cache)

        # Finished: merge the old finished beams with those that ended now.
        new_scores = top_lp / brevity_penalty(alpha, i + 1)
        new_scores = jnp.where(top_eos, new_scores, NEG_INF)
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)
        all_flags = jnp.concatenate([fin_flags, top_eos], axis=1)
        fin_scores, fin_pos = jax.lax.top_k(all_scores, k)
        fin_seqs = _gather_beams_2d(all_seqs, fin_pos)
        fin_flags = jnp.take_along_axis(all_flags, fin_pos, axis=1)
        return i + 1, new_alive_seqs, new_alive_lp, fin_seqs, fin_scores, fin_flags, cache

    alive_lp = jnp.concatenate(
        [jnp.zeros((batch, 1), jnp.float32), jnp.full((batch, k - 1), NEG_INF, jnp.float32)], 1
    )
    init = (
        jnp.zeros((), jnp.int32),
        jnp.zeros((batch, k, length), jnp.int32),
        alive_lp,
        jnp.zeros((batch, k, length), jnp.int32),
        jnp.full((batch, k), NEG_INF, jnp.float32),
        jnp.zeros((batch, k), bool),
        cache,
    )
    _, alive_seqs, alive_lp, fin_seqs, fin_scores, fin_flags, _ = jax.lax.while_loop(
        cond, body, init
    )
    # Examples without any finished beam fall back to their alive beams.
    none_finished = ~jnp.any(fin_flags, axis=1)
    alive_scores = alive_lp / brevity_penalty(alpha, length)
    seqs = jnp.where(none_finished[:, None, None], alive_seqs, fin_seqs)
    scores = jnp.where(none_finished[:, None], alive_scores, fin_scores)
    # top_k sorted descending; return ascending (best last).
    return seqs[:, ::-1], scores[:, ::-1]


def decode(decode_fn: Callable[..., tuple[Array, Array]], prompt: Array, cache: Any,
           tokens_to_logits: TokensToLogits, *, eos_id: int, rng: Array | None = None,
           num_decodes: int = 1, **decoder_params) -> tuple[Array, Array]:
    """Runs ``beam_search`` (``num_decodes`` beams) or a sampler (``num_decodes`` samples; a
    functools.partial of either, e.g. from gin, works too) the same way: returns ``(sequences
    <int32>[B, N, L], scores [B, N])`` in ascending score order, the best decode last."""
    base = getattr(decode_fn, "func", decode_fn)
    if base is beam_search or getattr(base, "__name__", "") == "beam_search":
        return decode_fn(prompt, cache, tokens_to_logits, eos_id=eos_id, beam_size=num_decodes,
                         **decoder_params)
    if rng is None and decoder_params.get("temperature", 1.0) != 0.0:
        rng = jax.random.PRNGKey(0)
    seqs, scores = decode_fn(prompt, cache, tokens_to_logits, eos_id=eos_id, rng=rng,
                             num_decodes=num_decodes, **decoder_params)
    order = jnp.argsort(scores, axis=-1)
    return (jnp.take_along_axis(seqs, order[:, :, None], axis=1),
            jnp.take_along_axis(scores, order, axis=1))


def shift_left(x: Array) -> Array:
    """Input-aligned -> target-aligned (position i gets x[i + 1]; the last becomes 0)."""
    return jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)


def remove_prompt(seqs: Array, prompt_len: Array) -> Array:
    """seqs [B, N, L]; prompt_len [B] -> the continuation of each row, left-aligned."""
    length = seqs.shape[-1]
    idx = jnp.arange(length)[None, None, :] + prompt_len[:, None, None]
    out = jnp.take_along_axis(seqs, jnp.minimum(idx, length - 1), axis=-1)
    return jnp.where(idx < length, out, 0)
