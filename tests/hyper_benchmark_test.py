"""benchmarks/hyper_layer.py runs its quick configuration and writes a self-describing JSON."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "hyper_layer.py"


def _load():
    spec = importlib.util.spec_from_file_location("hyper_layer_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_writes_json(tmp_path):
    out = tmp_path / "hyper_layer.json"
    result = _load().main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    assert data["benchmark"] == "hyper_layer" and data["quick"] is True
    assert {"platform", "device_kind", "host_cpus"} <= set(data["device"])
    assert {"jax", "jaxlib", "flax", "optax"} <= set(data["versions"])
    assert data["config"]["d_model"] == 32 and data["config"]["num_experts"] == [4]
    assert set(data["targets"]) == {
        "hypermoe_over_switch_train_step",
        "hypermoe_over_switch_forward",
        "hyper_expert_speedup_forward",
        "hyper_expert_speedup_train_step",
    }
    assert isinstance(data["targets_met"], bool)
    (row,) = data["results"]
    reps = data["config"]["repetitions"]
    he_reps = data["config"]["hyper_expert_repetitions"]
    for name in (
        "switch_forward", "hypermoe_forward", "switch_train_step", "hypermoe_train_step",
        "hyper_expert_efficient_forward", "hyper_expert_literal_forward",
        "hyper_expert_efficient_train_step", "hyper_expert_literal_train_step",
    ):
        assert row["ms"][name] > 0, name
        want = he_reps if name.startswith("hyper_expert") else reps
        assert len(row["ms_all"][name]) == want, name
    # The layer ratios are paired (per repetition), recomputable from the raw timings.
    for name, (num, den) in {
        "hypermoe_over_switch_forward": ("hypermoe_forward", "switch_forward"),
        "hypermoe_over_switch_train_step": ("hypermoe_train_step", "switch_train_step"),
    }.items():
        a, b = row["ms_all"][num], row["ms_all"][den]
        paired = statistics.median(u / v for u, v in zip(a, b))
        # (ms_all is rounded to the microsecond; the quick calls take a fraction of a ms.)
        assert abs(row["ratios"][name] - paired) <= 1e-2 * paired, name
        of_medians = row["layer_ratio_other_estimates"]["ratio_of_medians"][name]
        want = statistics.median(a) / statistics.median(b)
        assert abs(of_medians - want) <= 1e-2 * want, name
    for name, t in row["targets"].items():
        assert t["met"] == (
            t["value"] <= float(t["target"][3:]) if t["target"].startswith("<=")
            else t["value"] >= float(t["target"][3:])
        ), name
    # The two HyperExpert forms computed the same thing.
    check = row["hyper_expert_check"]
    scale = max(1.0, check["rms_literal_output"])
    assert check["max_abs_diff_efficient_vs_literal"] <= 1e-5 * scale
