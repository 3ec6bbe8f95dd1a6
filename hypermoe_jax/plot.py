"""Figures of a training run, drawn from its ``metrics.jsonl``; and the figures of the studies.

    python -m hypermoe_jax.plot RUN_DIR [--out DIR]

RUN_DIR is a run's ``MODEL_DIR`` (the directory holding ``metrics.jsonl``). Writes, under
``RUN_DIR/figures`` (or ``--out``):

* ``loss.png``: training loss and the periodic eval loss, and bits per token, against the step;
* ``expert_load.png``: one heatmap per MoE layer -- the share of the tokens each expert received
  at each logged training step -- and the fraction of tokens dropped by capacity, per layer.

``read_metrics`` parses ``metrics.jsonl`` (one JSON record per logged step and split, written by
``training.reporting.MetricsWriter``; a resumed run may log a step twice: the last record wins).
The study figures (``curves_figure``, ``k_sweep_figure``, ``bars_figure``,
``similarity_figure``) take the aggregates of ``hypermoe_jax.study``'s ``results.json``.
Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# ``moe/<stack>/layer_<i>/<metric>``: the per-layer MoE metrics a model reports.
LAYER_METRIC = re.compile(r"^moe/(?P<layer>[^/]+/layer_\d+)/(?P<metric>[^/]+)$")


class PlotError(ValueError):
    """Bad input to a figure (no metrics file, nothing to draw)."""


# --------------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The records of ``RUN_DIR/metrics.jsonl`` by split (``train``, ``eval``, ...), in step
    order, one per step (the last one logged)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        what = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise PlotError(
            f"{run_dir} {what}. Pass a training run's directory -- the MODEL_DIR given to "
            "python -m hypermoe_jax.train (it holds metrics.jsonl, checkpoints/ and "
            "tensorboard/), e.g. runs/quickstart.")
    by_split: dict[str, dict[int, dict[str, Any]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, split = int(rec["step"]), str(rec["split"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlotError(f"{path} line {n} is not a metrics record ({e}).") from None
        by_split.setdefault(split, {})[step] = rec
    if not by_split:
        raise PlotError(f"{path} is empty: the run logged no step yet.")
    return {s: [recs[k] for k in sorted(recs)] for s, recs in by_split.items()}


def scalar_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of a scalar metric over the records that have it."""
    pts = [(r["step"], float(r[key])) for r in records if np.ndim(r.get(key)) == 0
           and key in r]
    if not pts:
        return np.zeros(0, int), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps), np.asarray(values)


def layer_series(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per MoE layer (``decoder/layer_1``, ...): ``steps``, ``load`` <[T, E]> (each expert's share
    of the routed tokens at each logged step) and ``dropped`` <[T]> (the fraction dropped)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        for key, value in r.items():
            m = LAYER_METRIC.match(key)
            if m and m["metric"] == "expert_load":
                d = out.setdefault(m["layer"], {"steps": [], "load": [], "dropped": []})
                d["steps"].append(r["step"])
                d["load"].append(np.asarray(value, float).reshape(-1))
                d["dropped"].append(float(r.get(f"moe/{m['layer']}/dropped_fraction", np.nan)))
    return {k: {"steps": np.asarray(v["steps"]), "load": np.stack(v["load"]),
                "dropped": np.asarray(v["dropped"])}
            for k, v in sorted(out.items(), key=lambda kv: _layer_order(kv[0]))}


def _layer_order(name: str) -> tuple[str, int]:
    stack, _, idx = name.rpartition("/layer_")
    return stack, int(idx)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("Figures need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def loss_figure(metrics: Mapping[str, list[dict[str, Any]]], path: Path,
                title: str = "") -> Path:
    """Loss and bits per token against the step: training (logged) and eval (periodic)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "loss", "loss (nats / token, with aux losses)"),
                           (axes[1], "bits_per_token", "bits per token")):
        for split, style in (("train", "-"), ("eval", "o-")):
            steps, values = scalar_series(metrics.get(split, []), key)
            if len(steps):
                ax.plot(steps, values, style, ms=3, label=split)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title or "loss")
    return _save(fig, path)


def expert_load_figure(metrics: Mapping[str, list[dict[str, Any]]], path: Path,
                       title: str = "") -> Path:
    """A heatmap of expert load over training per MoE layer, and the dropped fraction."""
    layers = layer_series(metrics.get("train", []))
    if not layers:
        raise PlotError("No per-layer expert load in the training records (a dense model, or "
                        "a run that logged no step): nothing to draw.")
    plt = _pyplot()
    n = len(layers)
    fig, axes = plt.subplots(n + 1, 1, figsize=(9, 1.6 * n + 2.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1] * n + [1.2]})
    vmax = max(float(d["load"].max()) for d in layers.values())
    image = None
    for ax, (name, d) in zip(axes[:n, 0], layers.items()):
        steps, load = d["steps"], d["load"]
        edges = np.concatenate([[0], steps]) if len(steps) else steps
        image = ax.pcolormesh(edges, np.arange(load.shape[1] + 1) - 0.5, load.T, cmap="viridis",
                              vmin=0.0, vmax=vmax, shading="flat")
        ax.set_ylabel(f"{name}\nexpert")
        ax.set_yticks(range(load.shape[1]))
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=axes[:n, 0].tolist(), label="share of routed tokens")
    ax = axes[n, 0]
    for name, d in layers.items():
        ax.plot(d["steps"], 100 * d["dropped"], label=name)
    ax.set_xlim(0, max(int(d["steps"].max()) for d in layers.values()))
    ax.set_xlabel("step")
    ax.set_ylabel("dropped (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(title or "expert load per MoE layer (training batches)")
    return _save(fig, path)


def curves_figure(curves: Mapping[str, Mapping[str, Sequence[float]]], path: Path, *,
                  ylabel: str, title: str) -> Path:
    """Mean curve and a +-1 std band over seeds per variant: ``curves[variant]`` has ``step``,
    ``mean``, ``std`` and ``n`` (seeds)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, c in curves.items():
        steps, mean, std = (np.asarray(c[k], float) for k in ("step", "mean", "std"))
        (line,) = ax.plot(steps, mean, "o-", ms=3, label=f"{name} (n={c['n']})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def k_sweep_figure(sweep: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path, *,
                   ylabel: str, title: str) -> Path:
    """The metric against the experts per token at inference, mean +- std over seeds:
    ``sweep[variant][str(k)]`` has ``mean`` and ``std``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, by_k in sweep.items():
        ks = sorted(by_k, key=int)
        ax.errorbar([int(k) for k in ks], [by_k[k]["mean"] for k in ks],
                    yerr=[by_k[k]["std"] for k in ks], fmt="o-", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(k) for k in ks], [str(k) for k in ks])
    ax.set_xlabel("experts per token at inference (k)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def bars_figure(values: Mapping[str, Sequence[float]], path: Path, *, ylabel: str,
                title: str) -> Path:
    """One bar per variant (mean over seeds, +-1 std) with every seed's value as a dot."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(values) + 2, 3.8))
    names = list(values)
    for i, name in enumerate(names):
        v = np.asarray(values[name], float)
        ax.bar(i, v.mean(), yerr=v.std(ddof=1) if len(v) > 1 else 0, capsize=4, alpha=0.6)
        ax.plot(np.full(len(v), i), v, "k.", ms=6)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    lo = min(float(np.min(v)) for v in values.values())
    hi = max(float(np.max(v)) for v in values.values())
    pad = max(hi - lo, 1e-6) * 0.6
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def similarity_figure(matrix: np.ndarray, labels: Sequence[str], path: Path, *,
                      title: str) -> Path:
    """A cosine-similarity heatmap (rows and columns: ``labels``)."""
    plt = _pyplot()
    n = len(labels)
    fig, ax = plt.subplots(figsize=(0.28 * n + 3, 0.28 * n + 2))
    image = ax.imshow(np.asarray(matrix), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    fig.colorbar(image, ax=ax, label="cosine similarity")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def run_figures(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """``loss.png`` and (for MoE runs) ``expert_load.png`` of one run; returns their paths."""
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / "figures"
    name = run_dir.absolute().name
    paths = [loss_figure(metrics, out / "loss.png", title=f"{name}: loss")]
    if layer_series(metrics.get("train", [])):
        paths.append(expert_load_figure(metrics, out / "expert_load.png",
                                        title=f"{name}: expert load per MoE layer"))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("run_dir", help="a training run's MODEL_DIR (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="where the PNGs go (default RUN_DIR/figures)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        paths = run_figures(args.run_dir, args.out)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
