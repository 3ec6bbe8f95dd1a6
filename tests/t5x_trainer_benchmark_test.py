"""benchmarks/t5x_trainer.py: the arithmetic and the parsing of what T5X reports (the runs
themselves take minutes: the benchmark is run by hand, results in benchmarks/results/)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "t5x_trainer.py"
_spec = importlib.util.spec_from_file_location("t5x_trainer_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_summarize_medians_steady_rate_and_ratios():
    walls = {"t5x": {2: [50.0, 80.0, 52.0], 12: [72.0, 70.0, 71.0]},  # one slow outlier
             "ours": {2: [40.0, 41.0, 39.0], 12: [45.0, 46.0, 44.0]}}
    reported = {"t5x": [{"steps_per_second": 2.0, "compilation_seconds": 20.0},
                        {"steps_per_second": 4.0, "compilation_seconds": 30.0}],
                "ours": [{"steps_per_second": 3.0}, {"steps_per_second": None}]}
    out = bench.summarize(walls, reported, 2, 12)
    t5x, ours = out["t5x"], out["ours"]
    assert t5x["median_wall_seconds"] == {"2": 52.0, "12": 71.0}  # the outlier does not count
    assert t5x["fixed_seconds"] == 52.0 and ours["fixed_seconds"] == 40.0
    assert t5x["relative_spread"] == {"2": pytest.approx(30 / 52, abs=1e-3),
                                      "12": pytest.approx(2 / 71, abs=1e-3)}
    assert t5x["steps_per_second"] == pytest.approx(10 / 19, abs=1e-3)
    assert ours["steps_per_second"] == pytest.approx(2.0)
    assert t5x["reported_median"] == {"compilation_seconds": 25.0, "steps_per_second": 3.0}
    assert ours["reported_median"] == {"steps_per_second": 3.0}
    r = out["ratios"]["ours/t5x"]
    assert r["wall"] == {"2": pytest.approx(40 / 52, abs=1e-3), "12": pytest.approx(45 / 71,
                                                                                      abs=1e-3)}
    assert r["steps_per_second"] == pytest.approx(2.0 / (10 / 19), abs=2e-3)
    assert r["reported_steps_per_second"] == pytest.approx(1.0)
    # Long runs that were not slower than the short ones: noise, no rate.
    noisy = bench.summarize({"t5x": {2: [50.0], 12: [49.0]}, "ours": walls["ours"]}, {}, 2, 12)
    assert noisy["t5x"]["steps_per_second"] is None
    assert noisy["ratios"]["ours/t5x"]["steps_per_second"] is None


def test_schedule_interleaves_and_rotates():
    cfg = bench.Config(steps=10, short_steps=2, repeats=3)
    order = bench.schedule(cfg, ("a", "b", "c"))
    assert len(order) == 3 * 2 * 3
    assert order[:6] == [("a", 2), ("b", 2), ("c", 2), ("a", 10), ("b", 10), ("c", 10)]
    assert [name for name, _ in order[6:9]] == ["b", "c", "a"]  # the next round starts later
    assert [name for name, _ in order[12:15]] == ["c", "a", "b"]
    for name in "abc":
        assert sorted(s for n, s in order if n == name) == [2, 2, 2, 10, 10, 10]


def test_trainers_differ_only_as_named(tmp_path):
    cfg = bench.QUICK
    ours = bench.trainer_argv("ours", cfg, tmp_path, 6)
    off = bench.trainer_argv("ours_no_autotune", cfg, tmp_path, 6)
    assert [a for a in off if a not in ours] == [
        "--gin.hypermoe_jax.training.datasets.pipeline_options.autotune=False"]
    assert bench.trainer_argv("ours_warm_cache", cfg, tmp_path, 6) == ours
    cache = tmp_path / "cache"
    assert bench.trainer_env("ours", cache)["HYPERMOE_COMPILATION_CACHE"] == "0"
    assert bench.trainer_env("ours_warm_cache", cache)["HYPERMOE_COMPILATION_CACHE"] == str(cache)
    assert "JAX_COMPILATION_CACHE_DIR" not in bench.trainer_env("t5x", cache)


def test_t5x_reported_parses_its_log_lines():
    log = ("I1202 logging_writer.py:48] [0] collection=train timing/compilation_seconds=27.96\n"
           "I1202 logging_writer.py:48] [5] collection=train accuracy=0.1, "
           "timing/steps_per_second=4.25, timing/uptime=3\n"
           "I1202 logging_writer.py:48] [10] collection=train accuracy=0.2, "
           "timing/steps_per_second=5.5, timing/uptime=4\n")
    assert bench.t5x_reported(log) == {"compilation_seconds": 27.96, "steps_per_second": 5.5}


def test_both_trainers_get_the_same_run():
    cfg = bench.QUICK
    t5x = " ".join(bench.t5x_argv(cfg, Path("/m"), 6))
    ours = " ".join(bench.ours_argv(cfg, Path("/m"), 6))
    assert f"t5x/{cfg.model}.gin" in t5x and f"models/{cfg.model}.gin" in ours
    for shared in ("--gin.TRAIN_STEPS=6", f"--gin.BATCH_SIZE={cfg.batch_size}",
                   f"'targets': {cfg.length}", f"--gin.MIXTURE_OR_TASK_NAME='{cfg.task}'"):
        assert shared in t5x and shared in ours
