"""Decoding: beam search vs exhaustive search, sampling, and cached == uncached model decoding."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import tiny_moe

from hypermoe_jax import architectures as arch
from hypermoe_jax import decoding, models
from hypermoe_jax.architectures import sizes

EOS = 1


# --------------------------------------------------------------------------------------------
# A toy model: next-token logits depend on (previous token, position) only.
# --------------------------------------------------------------------------------------------


def toy_table(vocab=4, length=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(vocab, length, vocab)).astype(np.float32) * 2.0


def toy_tokens_to_logits(table):
    table = jnp.asarray(table)

    def fn(state: decoding.DecodingState):
        logits = table[state.cur_token[:, 0], state.cur_index]
        # A cache that counts calls (checks it is threaded through and expanded per row).
        cache = {"calls": state.cache["calls"] + 1, "index": state.cache["index"] + 1}
        return logits, cache

    return fn


def toy_cache(batch):
    return {"calls": jnp.zeros((batch,), jnp.int32), "index": jnp.zeros((), jnp.int32)}


def log_softmax_np(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def brute_force_best(table, alpha, prompt=None):
    """Best finished (EOS-terminated) sequence by length-penalised score, by enumeration; forced
    prompt positions add nothing to the log probability."""
    vocab, length, _ = table.shape
    prompt = [0] * length if prompt is None else list(prompt)
    best, best_score = None, -np.inf
    for n in range(1, length + 1):
        for body in itertools.product(range(vocab), repeat=n - 1):
            seq = list(body) + [EOS]
            if EOS in body or any(p and p != t for p, t in zip(prompt, seq)):
                continue
            lp = sum(sequence_log_prob_step(table, seq, i) for i in range(n) if not prompt[i])
            score = lp / ((5.0 + n) / 6.0) ** alpha
            if score > best_score:
                best, best_score = seq + [0] * (length - n), score
    return best, best_score


def sequence_log_prob_step(table, seq, i):
    prev = 0 if i == 0 else seq[i - 1]
    return log_softmax_np(table[prev, i])[seq[i]]


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_wide_beam_search_is_exhaustive(alpha):
    vocab, length = 4, 4
    tables = [toy_table(vocab, length, seed) for seed in range(3)]
    table = np.stack(tables)  # one table per example: fold into the token axis
    beam = vocab**length

    def t2l(state):
        n = state.cur_token.shape[0]
        example = jnp.arange(n) // beam
        logits = jnp.asarray(table)[example, state.cur_token[:, 0], state.cur_index]
        return logits, state.cache

    prompt = jnp.zeros((3, length), jnp.int32)
    seqs, scores = jax.jit(
        lambda p, c: decoding.beam_search(p, c, t2l, eos_id=EOS, beam_size=beam, alpha=alpha)
    )(prompt, toy_cache(3))
    assert seqs.shape == (3, beam, length)
    assert bool(jnp.all(jnp.diff(scores, axis=1) >= -1e-6))  # ascending
    for b in range(3):
        want, want_score = brute_force_best(tables[b], alpha)
        np.testing.assert_array_equal(np.asarray(seqs[b, -1]), want)
        np.testing.assert_allclose(float(scores[b, -1]), want_score, rtol=1e-5)


def test_beam_search_forced_prompt():
    table = toy_table(5, 5, seed=4)
    prompt = jnp.asarray([[3, 2, 0, 0, 0]], jnp.int32)
    seqs, scores = decoding.beam_search(prompt, toy_cache(1), toy_tokens_to_logits(table),
                                        eos_id=EOS, beam_size=5**4, alpha=0.0)
    want, want_score = brute_force_best(table, 0.0, prompt=[3, 2, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(seqs[0, -1]), want)
    np.testing.assert_allclose(float(scores[0, -1]), want_score, rtol=1e-5)


def test_greedy_and_top1_sampling_follow_argmax():
    table = toy_table(6, 6, seed=1)
    t2l = toy_tokens_to_logits(table)
    prompt = jnp.zeros((2, 6), jnp.int32)
    seqs, lp = decoding.greedy(prompt, toy_cache(2), t2l, eos_id=EOS)
    want, prev, want_lp = [], 0, 0.0
    for i in range(6):
        tok = int(np.argmax(table[prev, i]))
        want_lp += log_softmax_np(table[prev, i])[tok]
        want.append(tok)
        if tok == EOS:
            break
        prev = tok
    want += [0] * (6 - len(want))
    np.testing.assert_array_equal(np.asarray(seqs[0]), want)
    np.testing.assert_allclose(float(lp[0]), want_lp, rtol=1e-5)
    sampled, _ = decoding.temperature_sample(
        prompt, toy_cache(2), t2l, eos_id=EOS, rng=jax.random.PRNGKey(0), temperature=5.0,
        topk=1, num_decodes=3,
    )
    np.testing.assert_array_equal(np.asarray(sampled[0, 2]), want)


def test_sampling_prompt_eos_and_log_probs():
    table = toy_table(6, 8, seed=2)
    t2l = toy_tokens_to_logits(table)
    prompt = jnp.asarray([[4, 5, 0, 0, 0, 0, 0, 0]] * 2, jnp.int32)
    seqs, lps = decoding.temperature_sample(
        prompt, toy_cache(2), t2l, eos_id=EOS, rng=jax.random.PRNGKey(3), num_decodes=16,
        temperature=1.5,
    )
    seqs, lps = np.asarray(seqs), np.asarray(lps)
    assert seqs.shape == (2, 16, 8)
    assert (seqs[:, :, :2] == [4, 5]).all()
    assert len({tuple(s) for s in seqs[0]}) > 1  # it samples
    for s, lp in zip(seqs[0], lps[0]):
        s = list(s)
        n = s.index(EOS) + 1 if EOS in s else len(s)
        assert all(t == 0 for t in s[n:])  # padding after EOS
        # Log prob of the sampled (unforced) tokens under the untempered model.
        want = sum(sequence_log_prob_step(table, s, i) for i in range(2, n))
        np.testing.assert_allclose(lp, want, rtol=1e-4, atol=1e-5)


def test_cache_is_expanded_per_decode_and_gathered():
    table = toy_table(4, 5, seed=3)
    prompt = jnp.zeros((2, 5), jnp.int32)
    cache = {"calls": jnp.asarray([0, 100], jnp.int32), "index": jnp.zeros((), jnp.int32)}
    captured = {}

    def t2l(state):
        captured["shape"] = state.cache["calls"].shape
        return toy_tokens_to_logits(table)(state)

    decoding.beam_search(prompt, cache, t2l, eos_id=EOS, beam_size=3)
    assert captured["shape"] == (6,)


# --------------------------------------------------------------------------------------------
# Model decoding: cache == full re-forward
# --------------------------------------------------------------------------------------------

VOCAB = 32


def _config(variant):
    return sizes.sparse_t5(
        "tiny", tiny_moe(variant, eval_capacity_factor=4.0, train_capacity_factor=4.0),
        sparse_step=1, vocab_size=VOCAB, emb_dim=16, mlp_dim=32,
        num_heads=2, head_dim=8, dropout_rate=0.0, num_encoder_layers=2, num_decoder_layers=2,
        tied_embeddings=True,
    )


def _random_params(module, *args, seed=0):
    abstract = jax.eval_shape(
        lambda: nn.unbox(module.init(jax.random.PRNGKey(0), *args, enable_dropout=False))
    )
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        x = rng.standard_normal(a.shape).astype(np.float32)
        name = jax.tree_util.keystr(path)
        if "embedding" in name:
            return jnp.asarray(x)
        return jnp.asarray(x * (0.3 if a.ndim >= 2 else 0.1) + (1.0 if "scale" in name else 0))

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def _shift_right(x):
    return jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)


@pytest.fixture(scope="module")
def encdec():
    module = arch.EncoderDecoder(_config("hypermoe"))
    rng = np.random.default_rng(1)
    enc = rng.integers(2, VOCAB, (2, 6)).astype(np.int32)
    enc[1, -2:] = 0
    batch = {
        "encoder_input_tokens": jnp.asarray(enc),
        "decoder_input_tokens": jnp.zeros((2, 7), jnp.int32),
        "decoder_target_tokens": jnp.zeros((2, 7), jnp.int32),
    }
    # (seed 6: the random model's greedy output varies)
    variables = _random_params(module, batch["encoder_input_tokens"],
                               batch["decoder_input_tokens"], batch["decoder_target_tokens"],
                               seed=6)
    model = models.EncoderDecoderModel(module, decode_fn=decoding.temperature_sample,
                                       default_decoder_params={"temperature": 0.0})
    return model, variables, batch


def test_encoder_decoder_cached_greedy_equals_full_reforward(encdec):
    model, variables, batch = encdec
    module = model.module
    cached, aux = jax.jit(lambda v, b: model.predict_batch_with_aux(v, b))(variables, batch)

    def t2l(state):
        targets = jnp.ones_like(state.sequences)
        logits, _ = module.apply(
            variables, batch["encoder_input_tokens"], _shift_right(state.sequences), targets,
            enable_dropout=False,
        )
        return logits[jnp.arange(logits.shape[0]), state.cur_index], state.cache

    prompt = jnp.zeros(batch["decoder_input_tokens"].shape, jnp.int32)
    uncached, lp = jax.jit(lambda p: decoding.greedy(p, {}, t2l, eos_id=EOS))(prompt)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    np.testing.assert_allclose(aux["scores"], lp, rtol=1e-4, atol=1e-5)
    # Something non-trivial was decoded.
    assert len(set(np.asarray(cached).ravel().tolist())) > 2

    # Beam search with one beam is greedy (alpha 0: a longer finished beam cannot win).
    beam_model = models.EncoderDecoderModel(module, decode_fn=decoding.beam_search,
                                            default_decoder_params={"alpha": 0.0})
    beam, _ = jax.jit(lambda v, b: beam_model.predict_batch_with_aux(v, b, num_decodes=1))(
        variables, batch
    )
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(cached))


def test_decoder_only_prompted_cached_equals_full_reforward():
    module = arch.DecoderOnly(sizes.decoder_only(
        "tiny", tiny_moe("hypermoe", eval_capacity_factor=4.0), sparse_step=2, num_layers=4,
        vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2, head_dim=8, dropout_rate=0.0,
    ))
    length = 8
    tokens = jnp.zeros((2, length), jnp.int32)
    variables = _random_params(module, tokens, tokens)
    model = models.DecoderOnlyModel(module, default_decoder_params={"temperature": 0.0})
    # Prompts of lengths 3 and 2 (input-aligned, as the feature converter makes them).
    inputs = jnp.asarray([[0, 5, 6, 7, 0, 0, 0, 0], [0, 9, 4, 0, 0, 0, 0, 0]], jnp.int32)
    causal = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]], jnp.int32)
    batch = {"decoder_input_tokens": inputs, "decoder_target_tokens": tokens,
             "decoder_causal_attention": causal}
    continuation, _ = jax.jit(lambda v, b: model.predict_batch_with_aux(v, b))(variables, batch)

    def t2l(state):
        logits, _ = module.apply(variables, _shift_right(state.sequences),
                                 jnp.ones_like(state.sequences), enable_dropout=False)
        return logits[jnp.arange(logits.shape[0]), state.cur_index], state.cache

    prompt = jnp.asarray([[5, 6, 7, 0, 0, 0, 0, 0], [9, 4, 0, 0, 0, 0, 0, 0]], jnp.int32)
    full, _ = jax.jit(lambda p: decoding.greedy(p, {}, t2l, eos_id=EOS))(prompt)
    full = np.asarray(full)
    np.testing.assert_array_equal(full[:, :2], [[5, 6], [9, 4]])
    # The model returns the continuation only.
    np.testing.assert_array_equal(np.asarray(continuation[0]), np.pad(full[0, 3:], (0, 3)))
    np.testing.assert_array_equal(np.asarray(continuation[1]), np.pad(full[1, 2:], (0, 2)))


def test_beam_search_on_mesh_2x4x1_matches_one_device():
    """Decoding on 8 devices: each MoE layer routes the batch*beams single tokens of a step in
    one group per token shard, expert-parallel."""
    from hypermoe_jax import partitioning as part

    module = arch.EncoderDecoder(_config("hypermoe"))
    rng = np.random.default_rng(2)
    batch = {
        "encoder_input_tokens": jnp.asarray(rng.integers(2, VOCAB, (8, 6)), jnp.int32),
        "decoder_input_tokens": jnp.zeros((8, 5), jnp.int32),
        "decoder_target_tokens": jnp.zeros((8, 5), jnp.int32),
    }
    variables = _random_params(module, *batch.values(), seed=6)
    model = models.EncoderDecoderModel(module)

    def predict(v, b):
        return model.predict_batch_with_aux(v, b, num_decodes=2, return_all_decodes=True)

    seqs_1, aux_1 = jax.jit(predict)(variables, batch)
    mesh = part.make_mesh(2, 4, 1)
    with part.axis_rules(mesh):
        sharded = jax.device_put(batch, part.logical_sharding(mesh, (part.BATCH, part.LENGTH)))
        lowered = jax.jit(predict).lower(variables, sharded)
        seqs_8, aux_8 = lowered.compile()(variables, sharded)
    assert "all_to_all" in lowered.as_text()
    np.testing.assert_array_equal(np.asarray(seqs_8), np.asarray(seqs_1))
    np.testing.assert_allclose(aux_8["scores"], aux_1["scores"], rtol=1e-5, atol=1e-5)


def test_decoding_drops_no_token_a_sequence_decodes_the_same_alone_or_in_a_batch():
    """A decode step routes the batch of single tokens as one group; with a low eval capacity
    factor and 8 identical sequences (all on the same experts) a capacity-limited step would drop
    some of them. Decoding gives every token a slot, so each row equals the sequence alone."""
    cfg = sizes.sparse_t5(
        "tiny", tiny_moe("hypermoe", eval_capacity_factor=0.5, train_capacity_factor=0.5),
        sparse_step=1, vocab_size=VOCAB, emb_dim=16, mlp_dim=32, num_heads=2, head_dim=8,
        dropout_rate=0.0, num_encoder_layers=2, num_decoder_layers=2, tied_embeddings=True)
    module = arch.EncoderDecoder(cfg)
    enc = np.random.default_rng(3).integers(2, VOCAB, (1, 6)).astype(np.int32)

    def batch_of(n):
        return {"encoder_input_tokens": jnp.asarray(np.repeat(enc, n, axis=0)),
                "decoder_input_tokens": jnp.zeros((n, 7), jnp.int32),
                "decoder_target_tokens": jnp.zeros((n, 7), jnp.int32)}

    one = batch_of(1)
    variables = _random_params(module, one["encoder_input_tokens"],
                               one["decoder_input_tokens"], one["decoder_target_tokens"], seed=6)
    model = models.EncoderDecoderModel(module, decode_fn=decoding.temperature_sample,
                                       default_decoder_params={"temperature": 0.0})
    predict = jax.jit(lambda v, b: model.predict_batch_with_aux(v, b))
    alone, aux_alone = predict(variables, one)
    batched, aux_batched = predict(variables, batch_of(8))
    np.testing.assert_array_equal(np.asarray(batched), np.repeat(np.asarray(alone), 8, axis=0))
    np.testing.assert_allclose(aux_batched["scores"], np.repeat(aux_alone["scores"], 8),
                               rtol=1e-5, atol=1e-5)
