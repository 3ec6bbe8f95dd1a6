"""``hypermoe_jax.plot``: reading ``metrics.jsonl`` (as ``training.reporting.MetricsWriter`` writes
it) and drawing a run's figures; bad input is explained."""

import importlib.util
import json

import numpy as np
import pytest

from hypermoe_jax import plot
from hypermoe_jax.training.reporting import MetricsWriter

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, steps=(10, 20, 30), experts=4, resumed_at=20):
    """A run's metrics through the trainer's own writer; returns what was written, by step."""
    writer = MetricsWriter(run_dir, tensorboard=False)
    rng = np.random.default_rng(0)
    written = {}
    for step in [*steps, resumed_at]:  # a resumed run logs ``resumed_at`` a second time
        load = rng.dirichlet(np.ones(experts), size=2)
        m = {"loss": float(rng.uniform(1, 5)), "bits_per_token": float(rng.uniform(1, 7)),
             "moe/decoder/layer_1/expert_load": load[0],
             "moe/decoder/layer_1/dropped_fraction": float(rng.uniform()),
             "moe/decoder/layer_3/expert_load": load[1],
             "moe/decoder/layer_3/dropped_fraction": float(rng.uniform()),
             "moe/load_balance_loss": 1.0}
        writer.write(step, "train", m)
        written[step] = m
    writer.write(steps[-1], "eval", {"loss": 2.0, "bits_per_token": 3.0})
    return written


def test_read_metrics_matches_what_the_writer_wrote(tmp_path):
    written = _write_run(tmp_path)
    m = plot.read_metrics(tmp_path)
    assert sorted(m) == ["eval", "train"]
    steps, loss = plot.scalar_series(m["train"], "loss")
    assert steps.tolist() == [10, 20, 30]  # one record per step, the last one logged
    np.testing.assert_allclose(loss, [written[s]["loss"] for s in (10, 20, 30)], rtol=1e-6)
    layers = plot.layer_series(m["train"])
    assert list(layers) == ["decoder/layer_1", "decoder/layer_3"]
    d = layers["decoder/layer_3"]
    np.testing.assert_allclose(d["load"], np.stack(
        [written[s]["moe/decoder/layer_3/expert_load"] for s in (10, 20, 30)]), rtol=1e-6)
    np.testing.assert_allclose(d["dropped"], [
        written[s]["moe/decoder/layer_3/dropped_fraction"] for s in (10, 20, 30)], rtol=1e-6)
    assert plot.scalar_series(m["eval"], "bits_per_token")[1].tolist() == [3.0]


def test_layers_sort_by_stack_then_number():
    recs = [{"step": 1, **{f"moe/{n}/expert_load": [1.0] for n in
                           ("encoder/layer_11", "encoder/layer_3", "decoder/layer_1")}}]
    assert list(plot.layer_series(recs)) == ["decoder/layer_1", "encoder/layer_3",
                                             "encoder/layer_11"]


@needs_matplotlib
def test_cli_writes_the_run_figures(tmp_path, capsys):
    _write_run(tmp_path / "run")
    assert plot.main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in out] == ["loss.png", "expert_load.png"]
    for p in out:
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "expert_load.png").stat().st_size > 10_000


@needs_matplotlib
def test_dense_run_gets_the_loss_figure_only(tmp_path):
    MetricsWriter(tmp_path, tensorboard=False).write(5, "train", {"loss": 1.0})
    paths = plot.run_figures(tmp_path)
    assert [p.name for p in paths] == ["loss.png"]
    with pytest.raises(plot.PlotError, match="No per-layer expert load"):
        plot.expert_load_figure(plot.read_metrics(tmp_path), tmp_path / "x.png")


def test_bad_run_dirs_are_explained(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "MODEL_DIR" in err
    assert plot.main([str(tmp_path)]) == 1
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(plot.PlotError, match="empty"):
        plot.read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(plot.PlotError, match="line 1 is not a metrics record"):
        plot.read_metrics(tmp_path)


@needs_matplotlib
def test_study_figures_draw(tmp_path):
    curve = {"step": [10, 20], "mean": [3.0, 2.5], "std": [0.1, 0.2], "n": 3}
    assert plot.curves_figure({"a": curve, "b": curve}, tmp_path / "c.png", ylabel="y",
                              title="t").is_file()
    sweep = {"a": {"1": {"mean": 3.0, "std": 0.1}, "4": {"mean": 2.0, "std": 0.1}}}
    assert plot.k_sweep_figure(sweep, tmp_path / "k.png", ylabel="y", title="t").is_file()
    assert plot.bars_figure({"a": [1.0, 2.0], "b": [3.0, 3.5]}, tmp_path / "b.png", ylabel="y",
                            title="t").is_file()
    assert plot.similarity_figure(np.eye(3), ["x", "y", "z"], tmp_path / "s.png",
                                  title="t").is_file()
