"""Sparse upcycling (``convert.upcycle``): dense weights copied exactly (every expert = the dense
MLP), fresh routers / generators / adapters / frozen collections kept, logits equal to the dense
model's with softmax-over-top-k gates and no dropped token, ``p_top1 * FFN`` per MoE layer with
Switch's gates, any layout (step, placement, tail, scanned or unrolled, encoder-decoder or
decoder-only), and errors that say what differs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from helpers import HYPER_SMALL

from hypermoe_jax import architectures as arch
from hypermoe_jax import models
from hypermoe_jax.architectures import blocks, sizes
from hypermoe_jax.architectures.config import stack_layout
from hypermoe_jax.convert import upcycle
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig
from hypermoe_jax.layers.variants import moe_config

VOCAB = 64
E = 4
FIT = DispatchConfig(eval_capacity_factor=float(2 * E))  # capacity >= every token of a group
DROPLESS = DispatchConfig(impl="dropless")
SOFTMAX_TOPK = "softmax_topk"
FRESH_NAMES = ("router", "hyper_generator", "share_adapter")


# --------------------------------------------------------------------------------------------
# Configs, models and variables
# --------------------------------------------------------------------------------------------


def dense_cfg(enc=2, dec=2, *, dec_only=False, **kw):
    if dec_only:
        return sizes.decoder_only("tiny", None, num_layers=dec, vocab_size=VOCAB,
                                  dropout_rate=0.0, **kw)
    return sizes.t5_1_1("tiny", vocab_size=VOCAB, dropout_rate=0.0, num_encoder_layers=enc,
                        num_decoder_layers=dec, **kw)


def moe(variant="switch", k=1, gates=None, dispatch=FIT, **experts):
    return moe_config(variant, experts=ExpertsConfig(num_experts=E, **experts),
                      router=RouterConfig(num_selected=k, gate_normalization=gates),
                      dispatch=dispatch, hyper_experts=HYPER_SMALL)


def moe_cfg(layer_moe, step=2, enc=2, dec=2, *, dec_only=False, **kw):
    if dec_only:
        return sizes.decoder_only("tiny", layer_moe, sparse_step=step, num_layers=dec,
                                  dropout_rate=0.0, **{"vocab_size": VOCAB, **kw})
    kw = {"tied_embeddings": False, "vocab_size": VOCAB, **kw}
    return sizes.sparse_t5("tiny", layer_moe, sparse_step=step, dropout_rate=0.0,
                           num_encoder_layers=enc, num_decoder_layers=dec, **kw)


def make_model(cfg, dec_only=False):
    if dec_only:
        return models.DecoderOnlyModel(arch.DecoderOnly(cfg))
    return models.EncoderDecoderModel(arch.EncoderDecoder(cfg))


def shapes(dec_only):
    if dec_only:
        return {"decoder_input_tokens": (1, 8)}
    return {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)}


@functools.cache
def abstract_variables(cfg, dec_only=False):
    """The variables' shapes and dtypes (``jax.eval_shape`` of the init: no compilation)."""
    model = make_model(cfg, dec_only)
    return jax.eval_shape(lambda r: nn.unbox(model.get_initial_variables(r, shapes(dec_only))),
                          jax.random.PRNGKey(0))


@functools.cache
def random_variables(cfg, dec_only=False, seed=0):
    """Variables of the model of ``cfg`` with random values (the init's tree, shapes and dtypes):
    norm scales around 1, everything else N(0, 0.1)."""
    abstract = abstract_variables(cfg, dec_only)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        v = rng.normal(0.0, 0.1, leaf.shape)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            v = v + 1.0
        return jnp.asarray(v, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def make_batch(dec_only=False):
    """Two sequences with padding (encoder and decoder)."""
    rng = np.random.default_rng(1)
    enc = rng.integers(2, VOCAB, (2, 8)).astype(np.int32)
    enc[1, 5:] = 0
    dec = rng.integers(2, VOCAB, (2, 8)).astype(np.int32)
    dec[0, 6:] = 0
    din = np.concatenate([np.zeros((2, 1), np.int32), dec[:, :-1]], axis=1)
    batch = {"decoder_input_tokens": jnp.asarray(din), "decoder_target_tokens": jnp.asarray(dec)}
    if not dec_only:
        batch["encoder_input_tokens"] = jnp.asarray(enc)
    return batch


# Tiny test graphs: XLA's backend optimisations cost more compile time than they save.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def _forward(model):
    def run(variables, batch):
        args = [batch["decoder_input_tokens"], batch["decoder_target_tokens"]]
        if "encoder_input_tokens" in batch:
            args.insert(0, batch["encoder_input_tokens"])
        return model.module.apply(variables, *args, enable_dropout=False)

    return jax.jit(run, compiler_options=FAST_COMPILE)


def logits_of(model, variables, batch):
    """(logits, aux) of an eval forward pass (one compilation per model)."""
    return _forward(model)(variables, batch)


def real(batch):
    """Real (non-padding) target positions: MoE layers give padding 0 where the dense MLP gives
    FFN(x), so logits are compared there only."""
    return np.asarray(batch["decoder_target_tokens"]) > 0


@pytest.fixture(scope="module")
def dense_encdec():
    cfg = dense_cfg(2, 3)
    variables = random_variables(cfg)
    batch = make_batch()
    logits, _ = logits_of(make_model(cfg), variables, batch)
    return cfg, variables, batch, np.asarray(logits)


# --------------------------------------------------------------------------------------------
# The exact copy: an independent block mapping
# --------------------------------------------------------------------------------------------


def block_of(stack_tree, layout, i):
    """Block i of a stack (its own form: scanned ``layers`` [P, ...], ``layers_{p}`` or
    ``tail``), without a layer axis; and whether it is sparse."""
    n_in_periods = layout.periods * len(layout.pattern)
    if i < n_in_periods:
        period, j = divmod(i, len(layout.pattern))
        pattern = layout.pattern
    else:
        period, j = None, i - n_in_periods
        pattern = layout.tail
    name = "sparse" if pattern[j] else f"dense_{sum(not s for s in pattern[:j])}"
    if period is None:
        block = stack_tree["tail"][name]
    elif "layers" in stack_tree:
        block = jax.tree.map(lambda a: a[period], stack_tree["layers"][name])
    else:
        block = stack_tree[f"layers_{period}"][name]
    return block, pattern[j]


def assert_same(a, b, cast=False):
    """Same tree, same arrays (bitwise; ``cast``: ``b`` cast to ``a``'s dtypes first); returns
    the number of elements."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    size = 0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if cast:
            y = y.astype(x.dtype)
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
        size += x.size
    return size


def path_str(path):
    return "/".join(str(k.key) for k in path)


def assert_upcycled(dense_v, moe_c, fresh, out, kept):
    """Every dense weight copied to its place (block i -> block i, the dense MLP into every
    expert of a sparse block), ``kept`` exactly the fresh-only paths, unchanged, and nothing
    else in the MoE variables."""
    dense_v, fresh, out = jax.device_get((dense_v, fresh, out))  # host arrays: no op compiles
    assert jax.tree.structure(out) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(fresh), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    dp, mp = dense_v["params"], out["params"]
    covered = 0
    for name in ("token_embedder", "logits_dense"):
        if name in mp:
            covered += assert_same(mp[name], dp[name], cast=True)
    stack_names = [s for s in ("encoder", "decoder") if s in mp]
    assert stack_names == [s for s in ("encoder", "decoder") if s in dp]
    for s in stack_names:
        n = moe_c.num_encoder_layers if s == "encoder" else moe_c.num_decoder_layers
        step = moe_c.encoder_sparse_step if s == "encoder" else moe_c.decoder_sparse_step
        dense_layout = stack_layout(n, None)
        moe_layout = stack_layout(n, step, moe_c.sparse_placement)
        for name in ("relpos_bias", "final_norm"):
            covered += assert_same(mp[s][name], dp[s][name], cast=True)
        for i in range(n):
            d, d_sparse = block_of(dp[s], dense_layout, i)
            m, sparse = block_of(mp[s], moe_layout, i)
            assert not d_sparse
            assert set(m) == set(d)
            for part in d:
                if part == "mlp" and sparse:
                    experts = m["mlp"]["moe"]["experts"]
                    assert set(experts) == set(d["mlp"])
                    for w, value in d["mlp"].items():
                        assert experts[w].shape == (E, *value.shape)
                        for e in range(E):
                            assert_same(experts[w][e], value, cast=True)
                        covered += experts[w].size
                else:
                    covered += assert_same(m[part], d[part], cast=True)
    leaves = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(out)}
    fresh_leaves = {path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(fresh)}
    expected_kept = sorted(p for p in leaves if not p.startswith("params/")
                           or any(f"/{n}/" in p for n in FRESH_NAMES))
    assert kept == expected_kept
    for p in kept:
        covered += assert_same(leaves[p], fresh_leaves[p])
    assert covered == sum(v.size for v in leaves.values())
    return kept


# --------------------------------------------------------------------------------------------
# 1. Logits equal the dense model's: gates summing to 1, no token dropped
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,k,gates,dispatch,step,placement,scan", [
    ("switch", 1, SOFTMAX_TOPK, FIT, 2, "hf", True),         # capacity dispatch, a tail
    ("switch", 2, SOFTMAX_TOPK, DROPLESS, 1, "last", True),  # every block sparse
    ("smoe_dropout", 2, None, FIT, 2, "hf", False),          # its default gates, unrolled
    ("hyperrouter", 2, None, DROPLESS, 3, "hf", True),
], ids=["switch-top1-capacity", "switch-top2-dropless", "smoe_dropout-top2-unrolled",
        "hyperrouter-top2-dropless"])
def test_logits_equal_dense_with_softmax_topk_gates(dense_encdec, variant, k, gates, dispatch,
                                                    step, placement, scan):
    d_cfg, d_vars, batch, dense_logits = dense_encdec
    layer_moe = moe(variant, k, gates, dispatch)
    assert layer_moe.router.gates == SOFTMAX_TOPK
    cfg = moe_cfg(layer_moe, step, 2, 3, sparse_placement=placement, scan_layers=scan)
    model = make_model(cfg)
    fresh = random_variables(cfg, seed=2)
    out, kept = upcycle.upcycle_variables(d_vars, d_cfg, fresh, cfg)
    assert kept and all("router" in p for p in kept)
    logits, aux = logits_of(model, out, batch)
    for stack_aux in aux.values():
        if stack_aux is not None:  # the premise: nothing dropped
            np.testing.assert_array_equal(stack_aux.metrics["dropped_fraction"], 0.0)
    mask = real(batch)
    np.testing.assert_allclose(np.asarray(logits)[mask], dense_logits[mask], atol=1e-5,
                               rtol=1e-5)
    # The same MoE model from scratch is another function.
    fresh_logits, _ = logits_of(model, fresh, batch)
    assert np.abs(np.asarray(fresh_logits)[mask] - dense_logits[mask]).max() > 1e-2


def test_model_variables_decoder_only_equal_dense():
    """``upcycle_model_variables`` initialises the MoE model (its own init) and upcycles into it;
    decoder-only, top-2 softmax_topk, dropless."""
    d_cfg = dense_cfg(dec=1, dec_only=True)
    d_vars = random_variables(d_cfg, True)
    batch = make_batch(dec_only=True)
    cfg = moe_cfg(moe("switch", 2, SOFTMAX_TOPK, DROPLESS), 1, dec=1, dec_only=True)
    model = make_model(cfg, True)
    with jax.threefry_partitionable(False):  # 3x faster to compile on CPU
        out, kept = upcycle.upcycle_model_variables(d_vars, d_cfg, model, jax.random.PRNGKey(3))
    assert kept == ["params/decoder/layers/sparse/mlp/moe/router/kernel"]
    router = out["params"]["decoder"]["layers"]["sparse"]["mlp"]["moe"]["router"]["kernel"]
    assert 0.005 < float(jnp.std(router)) < 0.05  # the router's own init, N(0, 0.02)
    dense_logits, _ = logits_of(make_model(d_cfg, True), d_vars, batch)
    logits, _ = logits_of(model, out, batch)
    mask = real(batch)
    np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(dense_logits)[mask],
                               atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 2. Switch's default gates: p_top1 * FFN per MoE layer
# --------------------------------------------------------------------------------------------


def test_switch_default_gates_scale_the_dense_mlp_by_p_top1(dense_encdec):
    d_cfg, d_vars, batch, dense_logits = dense_encdec
    layer_moe = moe("switch", 1, None, FIT)
    assert layer_moe.router.gates == "none"
    cfg = moe_cfg(layer_moe, 2, 2, 3, sparse_placement="hf")
    model = make_model(cfg)
    out, _ = upcycle.upcycle_variables(d_vars, d_cfg, random_variables(cfg, seed=4), cfg)

    def capture(mdl, method):
        return method == "__call__" and mdl.name in ("mlp", "mlp_norm", "router")

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(variables):
        (logits, aux), state = model.module.apply(
            variables, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            batch["decoder_target_tokens"], enable_dropout=False,
            capture_intermediates=capture, mutable=["intermediates"])
        return logits, aux, state["intermediates"]

    logits, aux, inter = run(out)
    tokens = {"encoder": np.asarray(batch["encoder_input_tokens"]) > 0, "decoder": real(batch)}
    checked = 0
    for s in ("encoder", "decoder"):
        np.testing.assert_array_equal(aux[s].metrics["dropped_fraction"], 0.0)
        layout = stack_layout(3 if s == "decoder" else 2, 2, "hf")
        for i in layout.sparse_indices:  # scanned: intermediates stacked over periods
            block = jax.tree.map(lambda a, i=i: a[i // 2], inter[s]["layers"]["sparse"])
            h = block["mlp_norm"]["__call__"][0]
            y = block["mlp"]["__call__"][0][0]
            router_logits = block["mlp"]["moe"]["router"]["__call__"][0]  # one group/sequence
            p_top1 = jnp.max(jax.nn.softmax(router_logits, axis=-1), axis=-1)
            dense_block, _ = block_of(d_vars["params"][s], stack_layout(3 if s == "decoder"
                                                                        else 2, None), i)
            ffn = blocks.MlpBlock(mlp_dim=d_cfg.mlp_dim, activation=d_cfg.activation).apply(
                {"params": dense_block["mlp"]}, h)
            expected = np.where(tokens[s][..., None], np.asarray(p_top1[..., None] * ffn), 0.0)
            np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-4)
            # Not a trivial scale: the random router's top-1 probabilities are far from 1.
            assert float(jnp.mean(p_top1)) < 0.8
            checked += 1
    assert checked == 2
    mask = real(batch)
    assert np.abs(np.asarray(logits)[mask] - dense_logits[mask]).max() > 1e-2


# --------------------------------------------------------------------------------------------
# 3 / 4. Exact copies and kept paths, every variant and layout
# --------------------------------------------------------------------------------------------


BF16 = {"param_dtype": jnp.bfloat16}
LAYOUTS = [
    # dec_only, variant, step, placement, (enc, dec) layers, dense scanned, MoE scanned,
    # options of both configs, options of the MoE config
    (False, "switch", 2, "last", (4, 4), True, True, {}, {}),
    (False, "hypermoe", 2, "hf", (5, 3), True, False, {}, {}),           # tails, generator
    (False, "hyperrouter", 3, "hf", (4, 4), False, True, {}, BF16),      # frozen, router params
    (False, "moe_share", 3, "last", (3, 6), False, False, {"activation": "relu"}, {}),
    (True, "smoe_dropout", 2, "hf", (0, 5), True, True, {}, {}),         # frozen router only
    (True, "hypermoe", 3, "last", (0, 6), False, True, {}, {}),
    (True, "switch", 1, "hf", (0, 2), True, False, {"activation": "gated-silu"}, BF16),
    (True, "moe_share", 3, "hf", (0, 2), True, True, {}, {}),            # no period: tail only
]


def _layout_id(case):
    dec_only, variant, step, placement, layers, dense_scan, moe_scan, both_kw, moe_kw = case
    scan = "-".join("scan" if s else "unrolled" for s in (dense_scan, moe_scan))
    extra = "-".join(str(v) if isinstance(v, str) else "bf16" for v in {**both_kw,
                                                                         **moe_kw}.values())
    return "-".join(x for x in ("lm" if dec_only else "encdec", variant, f"step{step}",
                                placement, "x".join(map(str, layers)), scan, extra) if x)


@pytest.mark.parametrize(
    "dec_only,variant,step,placement,layers,dense_scan,moe_scan,both_kw,moe_kw", LAYOUTS,
    ids=[_layout_id(c) for c in LAYOUTS])
def test_exact_copy_and_kept_paths(dec_only, variant, step, placement, layers, dense_scan,
                                   moe_scan, both_kw, moe_kw):
    enc, dec = layers
    d_cfg = dense_cfg(enc, dec, dec_only=dec_only, scan_layers=dense_scan, **both_kw)
    cfg = moe_cfg(moe(variant), step, enc, dec, dec_only=dec_only, sparse_placement=placement,
                  scan_layers=moe_scan, **both_kw, **moe_kw)
    d_vars = random_variables(d_cfg, dec_only)
    fresh = random_variables(cfg, dec_only, seed=5)
    out, kept = upcycle.upcycle_variables(d_vars, d_cfg, fresh, cfg)
    kept = assert_upcycled(d_vars, cfg, fresh, out, kept)
    if moe_kw:  # copies take the MoE model's parameter dtype
        assert out["params"]["token_embedder"]["embedding"].dtype == jnp.bfloat16
    # What stays fresh is exactly what the variant adds.
    kinds = {("frozen" if p.startswith("frozen/") else next(n for n in FRESH_NAMES
                                                             if f"/{n}/" in p)) for p in kept}
    expected = {"switch": {"router"}, "hypermoe": {"router", "hyper_generator"},
                "hyperrouter": {"router", "frozen"}, "smoe_dropout": {"frozen"},
                "moe_share": {"router", "share_adapter"}}[variant]
    assert kinds == expected
    # The input trees are left as they were.
    assert_same(fresh, random_variables(cfg, dec_only, seed=5))


def test_block_mapping_is_by_block_index():
    """Swapping two dense blocks moves them in the MoE model: block i takes dense block i (not
    e.g. the i-th dense block of the MoE model or the period's first block)."""
    d_cfg = dense_cfg(4, 4, scan_layers=False)
    cfg = moe_cfg(moe(), 2, 4, 4, sparse_placement="hf", scan_layers=False)
    d_vars = random_variables(d_cfg)
    fresh = random_variables(cfg, seed=6)
    out, _ = upcycle.upcycle_variables(d_vars, d_cfg, fresh, cfg)
    enc = d_vars["params"]["encoder"]
    # hf, step 2: blocks 0, 1, 2, 3 = layers_0/dense_0, layers_0/sparse, layers_1/dense_0, ...
    got = out["params"]["encoder"]
    assert_same(got["layers_1"]["dense_0"], enc["layers_2"]["dense_0"])
    assert_same(got["layers_1"]["sparse"]["mlp_norm"], enc["layers_3"]["dense_0"]["mlp_norm"])
    swapped = {**d_vars, "params": {**d_vars["params"], "encoder": {
        **enc, "layers_2": enc["layers_3"], "layers_3": enc["layers_2"]}}}
    out2, _ = upcycle.upcycle_variables(swapped, d_cfg, fresh, cfg)
    assert_same(out2["params"]["encoder"]["layers_1"]["dense_0"], enc["layers_3"]["dense_0"])
    np.testing.assert_array_equal(
        out2["params"]["encoder"]["layers_1"]["sparse"]["mlp"]["moe"]["experts"]["wo"][2],
        enc["layers_2"]["dense_0"]["mlp"]["wo"])


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------


def test_config_differences_are_all_named():
    d_cfg = dense_cfg(2, 2)
    cfg = moe_cfg(moe(hidden_dim=256, activation="relu"), 2, 2, 4, emb_dim=32, num_heads=2,
                  vocab_size=128, tied_embeddings=True)
    with pytest.raises(ValueError, match="Cannot upcycle") as e:
        upcycle.upcycle_variables(abstract_variables(d_cfg), d_cfg, abstract_variables(cfg), cfg)
    msg = str(e.value)
    for part in ("emb_dim: dense 64 vs MoE 32",
                 "num_heads: dense 4 vs MoE 2",
                 "vocab_size: dense 64 vs MoE 128",
                 "num_decoder_layers: dense 2 vs MoE 4",
                 "hidden_dim (each expert is a copy of the dense MLP): dense 128 vs MoE 256",
                 "set it to 128",
                 "the dense MLP is 'gated-gelu' (gated: wi_0, wi_1, wo) but the experts are "
                 "'relu' (not gated: wi, wo)",
                 "the dense model's is untied (logits_dense), the MoE model's tied",
                 "pass tied_embeddings=False"):
        assert part in msg
    assert "num_encoder_layers" not in msg and "head_dim" not in msg


def test_config_activation_and_tied_output_alone():
    d_cfg = dense_cfg(2, 2, activation="gated-silu")
    cfg = moe_cfg(moe(), 2, 2, 2)
    with pytest.raises(ValueError, match=r"experts' activation: dense 'gated-silu' vs MoE "
                                         r"'gated-gelu'; set it to 'gated-silu'"):
        upcycle.upcycle_variables(abstract_variables(d_cfg), d_cfg, abstract_variables(cfg), cfg)
    d_cfg = dense_cfg(2, 2)
    tied = moe_cfg(moe(), 2, 2, 2, tied_embeddings=True)
    with pytest.raises(ValueError, match=r"output embedding.*tied_embeddings=False"):
        upcycle.upcycle_variables(abstract_variables(d_cfg), d_cfg, abstract_variables(tied),
                                  tied)


def test_source_must_be_dense():
    d_cfg = dense_cfg(2, 2)
    cfg = moe_cfg(moe(), 2, 2, 2)
    sparse_vars = random_variables(cfg)
    with pytest.raises(ValueError, match=r"dense_config is not dense.*sparse_step=2"):
        upcycle.upcycle_variables(sparse_vars, cfg, sparse_vars, cfg)
    # A dense config with an MoE model's variables.
    with pytest.raises(ValueError, match=r"dense_variables hold MoE layers"):
        upcycle.upcycle_variables({"params": sparse_vars["params"]}, d_cfg, sparse_vars, cfg)
    frozen_vars = random_variables(moe_cfg(moe("smoe_dropout"), 2, 2, 2))
    with pytest.raises(ValueError, match=r"'frozen' collection"):
        upcycle.upcycle_variables({**random_variables(d_cfg), "frozen": frozen_vars["frozen"]},
                                  d_cfg, sparse_vars, cfg)


def test_target_must_be_sparse_and_same_architecture():
    d_cfg = dense_cfg(2, 2)
    d_vars = random_variables(d_cfg)
    with pytest.raises(ValueError, match=r"moe_config has no MoE layer"):
        upcycle.upcycle_variables(d_vars, d_cfg, d_vars, d_cfg)
    lm_cfg = moe_cfg(moe(), 2, dec=2, dec_only=True)
    with pytest.raises(ValueError, match=r"dense model is encoder-decoder.*MoE model "
                                         r"decoder-only"):
        upcycle.upcycle_variables(d_vars, d_cfg, random_variables(lm_cfg, True), lm_cfg)


def test_variables_must_match_their_configs():
    d_cfg = dense_cfg(2, 2)
    d_vars = random_variables(d_cfg)
    step1 = moe_cfg(moe(), 1, 2, 2)
    step2 = moe_cfg(moe(), 2, 2, 2)
    with pytest.raises(ValueError, match=r"moe variables do not match moe_config.*encoder"):
        upcycle.upcycle_variables(d_vars, d_cfg, random_variables(step1), step2)
    # A dense tree of 3 layers given with a 2-layer dense config.
    with pytest.raises(ValueError, match=r"dense variables do not match dense_config"):
        upcycle.upcycle_variables(random_variables(dense_cfg(3, 3)), d_cfg,
                                  random_variables(step2), step2)
    # A tied MoE tree with an untied config: logits_dense has no place.
    tied = moe_cfg(moe(), 2, 2, 2, tied_embeddings=True)
    with pytest.raises(ValueError, match=r"logits_dense"):
        upcycle.upcycle_variables(d_vars, d_cfg, random_variables(tied), step2)
