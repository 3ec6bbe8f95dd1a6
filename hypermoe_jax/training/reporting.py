"""What a run reports: metrics to ``metrics.jsonl`` and TensorBoard (``MetricsWriter``), and the
lines it prints -- training progress, eval results and per-layer expert usage. (The time-based
progress lines of long loops are ``progress``'s.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from hypermoe_jax.training.progress import duration

# Per-layer MoE metrics (``moe/<name>/layer_<i>/...``): shown as expert-usage lines.
_PER_LAYER = re.compile(r"^moe/[^/]+/layer_\d+/")


def compute_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """A step's metrics (arrays or clu-style metric objects) as host numpy values."""
    out = {}
    for k, v in metrics.items():
        if hasattr(v, "compute"):
            v = v.compute()
        out[k] = np.asarray(jax.device_get(v))
    return out


class MetricsWriter:
    """JSONL (+ TensorBoard event files) under ``model_dir``; only process 0 writes."""

    def __init__(self, model_dir: Path, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = model_dir / "metrics.jsonl"
        self._tb = {}
        self.tensorboard = tensorboard and self.enabled
        self.model_dir = model_dir

    def _writer(self, split):
        if split not in self._tb:
            import tensorflow as tf

            self._tb[split] = tf.summary.create_file_writer(
                str(self.model_dir / "tensorboard" / split)
            )
        return self._tb[split]

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"step": int(step), "split": split}
        for k, v in metrics.items():
            v = np.asarray(v)
            rec[k] = float(v) if v.ndim == 0 else v.tolist()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tensorboard:
            import tensorflow as tf

            with self._writer(split).as_default():
                for k, v in metrics.items():
                    v = np.asarray(v, np.float64)
                    if v.ndim == 0:
                        tf.summary.scalar(k, float(v), step=int(step))
                    else:
                        for i, x in enumerate(v.reshape(-1)):
                            tf.summary.scalar(f"{k}/{i}", float(x), step=int(step))
                self._writer(split).flush()

    def close(self):
        for w in self._tb.values():
            w.close()


def usage_lines(metrics: Mapping[str, Any]) -> list[str]:
    """One line per MoE layer: expert load as percentages, dropped fraction."""
    lines = []
    for k in sorted(metrics):
        if k.endswith("expert_load"):
            prefix = k[: -len("expert_load")]
            load = np.asarray(metrics[k]).reshape(-1)
            dropped = metrics.get(prefix + "dropped_fraction")
            pct = " ".join(f"{100 * x:4.1f}" for x in load)
            extra = f"  dropped {100 * float(dropped):.1f}%" if dropped is not None else ""
            lines.append(f"  {prefix.rstrip('/')}: [{pct}]%{extra}")
    return lines


def progress_line(step, total, m, eta: float | None = None) -> str:
    """``step s/total  loss ...  lr ...  tok/s  steps/s  ETA`` and the expert-usage lines below
    it (``steps/s`` when ``m`` has ``steps_per_second``; ``ETA`` when ``eta`` is given)."""
    parts = [f"step {step}/{total}", f"loss {float(m['loss']):.4f}"]
    for key in ("bits_per_token", "accuracy", "moe/load_balance_loss"):
        for k in m:
            if k.endswith(key) and np.ndim(m[k]) == 0:
                parts.append(f"{k} {float(m[k]):.4f}")
                break
    parts.append(f"lr {m['learning_rate']:.2e}")
    parts.append(f"{m['tokens_per_second']:.0f} tok/s")
    if "steps_per_second" in m:
        parts.append(f"{float(m['steps_per_second']):.2f} steps/s")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    lines = ["  ".join(parts)]
    lines += usage_lines(m)
    return "\n".join(lines)


def eval_line(label: str, m) -> str:
    """Scalar metrics on one line (per-layer MoE metrics as expert-usage lines below it)."""
    items = [f"{k} {float(v):.4f}" for k, v in sorted(m.items())
             if np.ndim(v) == 0 and not _PER_LAYER.match(k)]
    return "\n".join([f"{label}: " + "  ".join(items), *usage_lines(m)])
