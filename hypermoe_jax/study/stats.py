"""The statistics of a study: per-seed values summarised (mean, sample std), a claim checked
(which variant is better on average, and whether by more than twice the standard error of the
difference), and curves averaged over seeds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of per-seed values."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v), "values": v}


def compare(claim: str, paper: str, ours: Sequence[float], other: Sequence[float], *,
            lower_is_better: bool) -> dict[str, Any]:
    """Whether ``ours`` beats ``other`` on average (``agrees``), and whether by more than twice
    the standard error of the difference of the means (``clear``)."""
    a, b = summarize(ours), summarize(other)
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    agrees = diff < 0 if lower_is_better else diff > 0
    return {"claim": claim, "paper": paper,
            "ours": f"{a['mean']:.3f} +- {a['std']:.3f} vs {b['mean']:.3f} +- {b['std']:.3f} "
                    f"(n={a['n']}/{b['n']}; difference {diff:+.3f}, 2 SE {2 * se:.3f})",
            "difference": diff, "standard_error": se, "agrees": bool(agrees),
            "clear": bool(agrees and abs(diff) > 2 * se)}


def mean_curve(curves: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Mean and std over seeds of curves logged at the same steps (the steps all share)."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    vals = np.asarray([[dict(zip(c["step"], c["value"]))[s] for s in common] for c in curves])
    std = vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return {"step": common, "mean": vals.mean(0).tolist(), "std": std.tolist(),
            "n": len(curves)}

