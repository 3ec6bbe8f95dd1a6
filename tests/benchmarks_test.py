"""The MoE layer speed benchmark runs end to end in its quick configuration and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being created
    spec.loader.exec_module(module)
    return module


def test_moe_layer_benchmark_quick(tmp_path):
    bench = load_benchmark("moe_layer")
    out = tmp_path / "moe_layer.json"
    result = bench.main(["--quick", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))

    assert on_disk["benchmark"] == "moe_layer" and on_disk["quick"] is True
    assert {"platform", "device_kind", "num_devices"} <= set(on_disk["device"])
    assert {"jax", "jaxlib", "flax"} <= set(on_disk["versions"])
    config = on_disk["config"]
    for key in ("d_model", "hidden_dim", "num_experts", "num_tokens", "capacity_factors"):
        assert key in config
    assert config["group_size"] > 0 and config["num_selected"] == 1
    target = on_disk["target"]
    assert target["max_ratio"] == 1.3 and target["num_experts"] == 8
    assert isinstance(target["met"], bool)
    assert set(target["met_by_dispatch_impl"]) == set(config["dispatch_impls"])

    rows = on_disk["results"]
    expected = (
        len(config["num_experts"])
        * len(config["num_tokens"])
        * len(config["capacity_factors"])
        * len(config["dispatch_impls"])
    )
    assert len(rows) == expected
    for row in rows:
        assert row["dense_ms"] > 0 and row["moe_ms"] > 0
        assert abs(row["ratio_moe_over_dense"] - row["moe_ms"] / row["dense_ms"]) < 1e-2 * max(
            1.0, row["ratio_moe_over_dense"]
        )
        assert len(row["moe_ms_all"]) == len(row["dense_ms_all"]) == config["repetitions"]
        assert len(row["moe_cpu_ms_all"]) == len(row["dense_cpu_ms_all"]) == config["repetitions"]
        for key in ("ratio_paired_median", "ratio_min", "ratio_cpu_time"):
            assert row[key] > 0, key
        assert row["num_groups"] * row["group_size"] == row["num_tokens"]
        assert row["expert_capacity"] >= 1


def test_any_k_benchmark_quick(tmp_path):
    bench = load_benchmark("any_k")
    out = tmp_path / "any_k.json"
    result = bench.main(["--quick", "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["benchmark"] == "any_k" and on_disk["quick"] is True
    ks = on_disk["config"]["k_values"]
    rows = on_disk["results"]
    assert [r["k"] for r in rows] == ks
    for r in rows:
        assert r["static_ms"] > 0 and r["traced_ms"] > 0
        assert len(r["static_ms_all"]) == on_disk["config"]["repetitions"]
    assert rows[-1]["static_over_static_kmax"] == 1.0
    target = on_disk["target"]
    assert target["k"] == min(ks) and isinstance(target["met"], bool)
    assert target["ratio"] == rows[0]["static_over_static_kmax"]
