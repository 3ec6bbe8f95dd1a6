"""Running the trainer for a study: one gin-configured run in this process (``gin_run``), the
bindings every run shares, a finished run's record kept beside it (``cached``: a study run again
reuses it, an unfinished run resumes), and the curves the figures need of a run."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from hypermoe_jax import plot
from hypermoe_jax.study.settings import Setting, StudyError

TRAIN_FN = "hypermoe_jax.training.train.train"
OPTIMIZER = "hypermoe_jax.training.optimizers.make_optimizer"
RECORD = "study_run.json"  # a finished run's figures, in its run directory


def gin_run(files: Sequence[str], bindings: Sequence[str]) -> Any:
    """One gin-configured run (``runs/pretrain.gin``, ``finetune.gin`` or ``eval.gin``) in this
    process; returns the run function's result."""
    import gin

    from hypermoe_jax.training import cli, gin_utils

    gin.clear_config()
    try:
        gin_utils.parse(list(files), list(bindings))
        return cli.run()
    finally:
        gin.clear_config()


def common_bindings(s: Setting, *, seed: int, lengths, batch_size: int) -> list[str]:
    out = [
        f"MODEL_SIZE = {s.model_size!r}", f"NUM_EXPERTS = {s.num_experts}",
        f"TASK_FEATURE_LENGTHS = {dict(lengths)!r}", f"BATCH_SIZE = {batch_size}",
        f"RANDOM_SEED = {seed}",
    ]
    if s.expert_hidden_dim is not None:
        out.append(f"hypermoe_jax.layers.experts.ExpertsConfig.hidden_dim = {s.expert_hidden_dim}")
    return out


def train_bindings(s: Setting, model_dir: Path, steps: int) -> list[str]:
    return [
        f"MODEL_DIR = {str(model_dir)!r}", f"TRAIN_STEPS = {steps}",
        f"EVAL_PERIOD = {s.eval_period}", f"EVAL_STEPS = {s.eval_steps}",
        f"CHECKPOINT_PERIOD = {steps}", "KEEP_CHECKPOINTS = 1", f"LOG_EVERY = {s.log_every}",
        f"{TRAIN_FN}.tensorboard = False",
    ]


def eval_bindings(s: Setting, run_dir: Path, split: str, out: str) -> list[str]:
    return [
        f"CHECKPOINT_PATH = {str(run_dir / 'checkpoints')!r}",
        f"EVAL_OUTPUT_DIR = {str(run_dir / out)!r}", f"EVAL_SPLIT = {split!r}",
        f"EVAL_STEPS = {s.test_steps!r}",
    ]


class NotFinished(Exception):
    """A run without its record, when only finished runs are reported (``report_only``)."""


_report_only = False


@contextlib.contextmanager
def reporting_only(on: bool) -> Iterator[None]:
    """Within it, ``cached`` trains nothing: a run without its record raises ``NotFinished``."""
    global _report_only
    before, _report_only = _report_only, on
    try:
        yield
    finally:
        _report_only = before


def cached(path: Path, make: Callable[[], dict]) -> dict:
    """``make()``'s record, written to ``path``; read back when a finished run left it."""
    if path.is_file():
        return json.loads(path.read_text())
    if _report_only:
        raise NotFinished(str(path.parent))
    rec = make()
    path.write_text(json.dumps(rec, indent=1))
    return rec


class skip_unfinished:
    """Skips a run that has not finished when only finished runs are reported."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is NotFinished


def check_done(summary: Mapping[str, Any], run_dir: Path) -> None:
    if summary.get("status") != "done":
        raise StudyError(f"The run in {run_dir} ended {summary.get('status')!r} at step "
                         f"{summary.get('step')}; run the study again to resume it.")


def check_some(runs: Mapping[Any, list], needed: Sequence[Any] | None = None) -> None:
    missing = [key for key in (needed or list(runs)) if not runs.get(key)]
    if missing:
        raise StudyError(f"No finished run of {missing} yet: nothing to report.")


def curves(run_dir: Path) -> dict[str, Any]:
    """What the figures need of a run's ``metrics.jsonl``: train and validation scalars, and
    the per-layer expert load over training."""
    m = plot.read_metrics(run_dir)
    out: dict[str, Any] = {}
    for split in ("train", "eval"):
        for key in ("loss", "cross_ent_loss", "bits_per_token"):
            steps, values = plot.scalar_series(m.get(split, []), key)
            out[f"{split}/{key}"] = {"step": steps.tolist(), "value": values.tolist()}
    out["load"] = {name: {"step": d["steps"].tolist(), "load": d["load"].tolist(),
                          "dropped": d["dropped"].tolist()}
                   for name, d in plot.layer_series(m.get("train", [])).items()}
    return out
