"""The full-model training step benchmark: a quick end-to-end run writes its JSON; the analytic
FLOP count agrees with the matmuls of the traced model; the peak table."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import jax
import jax.numpy as jnp
import pytest
from benchmarks_test import load_benchmark
from helpers import all_eqns

from hypermoe_jax.architectures.encoder_decoder import EncoderDecoder

bench = load_benchmark("train_step")


def test_train_step_benchmark_quick(tmp_path):
    out = tmp_path / "train_step.json"
    result = bench.main(["--quick", "--models", "dense", "switch", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "train_step" and on_disk["quick"] is True
    device = on_disk["device"]
    assert {"platform", "device_kind", "num_devices", "peak_bf16_flops"} <= set(device)
    assert on_disk["config"]["dtype"] == "bfloat16" and on_disk["config"]["optimizer"]
    reps, steps = on_disk["config"]["repetitions"], on_disk["config"]["steps"]
    tokens = on_disk["config"]["tokens_per_step"]
    for name in ("dense", "switch"):
        row = on_disk["models"][name]
        assert row["params"] > 0 and all(v > 0 for v in row["compile_s"].values())
        assert all(math.isfinite(v) for v in row["loss_first_last"])
        flops = row["model_flops_per_step"]
        assert flops["train"] == pytest.approx(3 * flops["forward"])
        for mode in ("train", "inference"):
            m = row[mode]
            assert len(m["step_ms_all"]) == reps and m["step_ms"] > 0
            assert m["step_ms"] == pytest.approx(statistics.median(m["step_ms_all"]), rel=1e-3)
            assert m["tokens_per_s"] == pytest.approx(tokens / m["step_ms"] * 1e3, rel=1e-3)
            assert m["mfu"] is None  # no peak for a CPU
    assert steps >= 1
    dense, switch = on_disk["models"]["dense"], on_disk["models"]["switch"]
    r = on_disk["ratios"]["switch_over_dense_train"]
    assert r["ratio_of_medians"] == pytest.approx(
        switch["train"]["step_ms"] / dense["train"]["step_ms"], rel=1e-2)
    assert r["ratio"] > 0 and r["ratio_min"] > 0
    targets = on_disk["targets"]
    assert targets["moe_over_dense_train"]["value"] == r["ratio"]
    assert targets["hypermoe_over_switch_train"]["met"] is None  # HyperMoE not run
    assert targets["hypermoe_mfu_train"]["applies"] is False


def _matmul_flops(fn, *args) -> float:
    """2 x multiply-adds of every dot_general in the traced function (nested jaxprs included)."""
    total = 0
    for eqn in all_eqns(jax.make_jaxpr(fn)(*args)):
        if eqn.primitive.name != "dot_general":
            continue
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        (_, rc), (_, rb) = eqn.params["dimension_numbers"]
        rhs_free = [s for i, s in enumerate(rhs) if i not in rc and i not in rb]
        total += 2 * math.prod(lhs) * math.prod(rhs_free)
    return total


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_model_flops_equal_the_traced_matmuls(size):
    """The formula against the dot_generals of the traced dense model (nothing compiled); the
    only matmuls it leaves out are the relative position biases' one-hot lookups."""
    cfg = dataclasses.replace(bench.QUICK, size=size, batch=2, length=24, vocab_size=128)
    tcfg = bench.transformer_config(cfg, "dense")
    # Unrolled layers: a scanned stack holds one period's matmuls in its scan body.
    module = EncoderDecoder(dataclasses.replace(tcfg, scan_layers=False))
    tokens = jnp.ones((cfg.batch, cfg.length), jnp.int32)
    params = jax.eval_shape(
        lambda r: module.init(r, tokens, tokens, tokens, enable_dropout=False), jax.random.key(0))
    traced = _matmul_flops(
        lambda p: module.apply(p, tokens, tokens, tokens, enable_dropout=False)[0], params)
    relpos = 2 * 2 * tcfg.num_heads * cfg.length**2 * tcfg.relative_attention_num_buckets
    flops = bench.model_flops(tcfg, cfg.batch, cfg.length, cfg.length)
    assert flops["forward"] + relpos == traced

    # Top-1 MoE with the dense hidden size: the dense FLOPs plus the routers (and the
    # HyperExperts: per token 4 d b, per step the generator).
    n_moe = tcfg.num_encoder_layers // 2  # MoE layers per stack (each stack sees its tokens)
    d, e, tokens_per_step = tcfg.emb_dim, cfg.num_experts, 2 * cfg.batch * cfg.length
    switch = bench.model_flops(bench.transformer_config(cfg, "switch"), cfg.batch, cfg.length,
                               cfg.length)
    assert switch["forward"] - flops["forward"] == n_moe * tokens_per_step * 2 * d * e
    hyper = bench.model_flops(bench.transformer_config(cfg, "hypermoe"), cfg.batch, cfg.length,
                              cfg.length)
    assert hyper["forward"] - switch["forward"] > n_moe * tokens_per_step * 4 * d * 64


def test_peak_table():
    assert bench.peak_flops("NVIDIA H200") == 989.4e12
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756.0e12
    assert bench.peak_flops("TPU v5 lite") == 197.0e12  # not v5p's 459: the longest prefix
    assert bench.peak_flops("TPU v5p") == 459.0e12
    assert bench.peak_flops("cpu") is None
    assert bench.peak_flops("Some Future Accelerator") is None
