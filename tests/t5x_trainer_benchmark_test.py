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


def test_summarize_steady_rate_and_overhead():
    walls = {"t5x": {10: 50.0, 20: 70.0}, "ours": {10: 40.0, 20: 50.0}}
    out = bench.summarize(walls, {}, 10)
    assert out["t5x"]["steps_per_second"] == pytest.approx(0.5)
    assert out["t5x"]["overhead_seconds"] == pytest.approx(30.0)
    assert out["ours"]["steps_per_second"] == pytest.approx(1.0)
    assert out["ours"]["overhead_seconds"] == pytest.approx(30.0)
    assert out["ratio_steps_per_second_ours_over_t5x"] == pytest.approx(2.0)
    assert out["ratio_wall_ours_over_t5x"] == {"10": 0.8, "20": pytest.approx(50 / 70, abs=1e-3)}
    # A longer run that was not slower: noise, no rate.
    noisy = bench.summarize({"t5x": {10: 50.0, 20: 49.0}, "ours": walls["ours"]}, {}, 10)
    assert noisy["t5x"]["steps_per_second"] is None
    assert noisy["ratio_steps_per_second_ours_over_t5x"] is None


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
