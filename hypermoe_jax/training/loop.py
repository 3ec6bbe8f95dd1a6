"""The steps of a training run: the loop that dispatches the train steps and, on their periods,
logs, evaluates and checkpoints (``run_steps``), with what it needs to stop well -- SIGTERM
(``_Preemption``) and a non-finite loss (``_Losses``, ``_nonfinite_message``).

The host runs a step ahead of the device: it reads step n's loss after dispatching step n + 1,
and at once only at the steps that log, evaluate or checkpoint, so a non-finite loss is found
before anything is written of the parameters after it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from hypermoe_jax.training import checkpoints as ckpt_lib
from hypermoe_jax.training import optimizers
from hypermoe_jax.training.datasets import DatasetConfig, num_target_tokens
from hypermoe_jax.training.errors import NonFiniteLossError, RunError
from hypermoe_jax.training.evaluate import evaluate_loss
from hypermoe_jax.training.progress import Progress
from hypermoe_jax.training.reporting import MetricsWriter, compute_metrics, eval_line, progress_line
from hypermoe_jax.training.state import TrainState, to_global


@dataclasses.dataclass
class Run:
    """What the steps and the final evals of one ``train`` call share: the model, the mesh, the
    checkpointer, the metrics writer, how to print, and the periods."""

    model: Any
    mesh: jax.sharding.Mesh
    optimizer: optimizers.OptimizerDef
    ckptr: ckpt_lib.Checkpointer
    writer: MetricsWriter
    say: Callable
    eval_cfg: DatasetConfig | None
    eval_steps: int
    model_dir: Path
    total_steps: int
    log_every: int
    eval_period: int
    checkpoint_period: int


@dataclasses.dataclass
class LoopEnd:
    """Where the steps ended: the state after them, and what a checkpoint and the summary
    record."""

    state: TrainState
    step: int
    batches_consumed: int
    status: str  # "done" (reached the end step) or "preempted"
    losses: list[float]
    last_eval: tuple[int, dict[str, Any]] | None  # (step, metrics) of the last periodic eval


def save(ckptr: ckpt_lib.Checkpointer, state: TrainState, step: int, batches_consumed: int,
         force: bool = False) -> None:
    """Checkpoints ``state`` with the data position (batches consumed)."""
    ckptr.save(state, {"batches_consumed": batches_consumed, "step": step}, force=force)


def run_steps(run: Run, state: TrainState, batches_consumed: int, step_fn, batches, *,
              end_step: int) -> LoopEnd:
    """Steps from ``state.step`` to ``end_step`` (fewer on SIGTERM), logging every
    ``log_every``, evaluating every ``eval_period`` and checkpointing every
    ``checkpoint_period`` steps (not at ``end_step``: the caller saves the final state), with
    time-based progress lines between the log lines.

    The host does not wait for each step: it reads a step's loss after dispatching the next one
    (``_Losses``), and at once only at the steps that log, evaluate or checkpoint -- so no
    checkpoint, eval or log is made of parameters after a non-finite loss."""
    step = start_step = int(state.step)
    status = "done"
    losses = _Losses(run.ckptr, start_step)
    last_eval: tuple[int, dict[str, Any]] | None = None
    progress = Progress("train", unit="step", total=run.total_steps, end=end_step,
                        start=start_step, say=run.say)
    with _Preemption() as preempt:
        while step < end_step:
            try:
                host_batch = next(batches)
            except StopIteration:
                raise RunError(
                    f"Training data ran out after {batches_consumed} batches; the train "
                    "dataset should repeat (num_epochs=None)."
                ) from None
            state, metrics = step_fn(state, to_global(host_batch, run.mesh))
            batches_consumed += 1
            step += 1
            losses.add(step, metrics["loss"])
            progress.advance(tokens=num_target_tokens(host_batch))
            log = step % run.log_every == 0 or step == end_step
            evaluate = run.eval_cfg is not None and run.eval_period and (
                step % run.eval_period == 0)
            checkpoint = step % run.checkpoint_period == 0 and step != end_step
            now = log or evaluate or checkpoint or preempt.requested
            losses.read(upto=step if now else step - 1)
            if log:
                _log(run, step, metrics, progress)
            elif progress.due():
                run.say(progress.line())
            if evaluate:
                last_eval = (step, evaluate_loss(run.model, state, run.eval_cfg, run.mesh,
                                                 run.eval_steps, label=f"eval @ step {step}",
                                                 say=run.say))
                run.writer.write(step, "eval", last_eval[1])
                run.say(eval_line(f"eval @ step {step}", last_eval[1]))
            if checkpoint:
                save(run.ckptr, state, step, batches_consumed)
            if preempt.requested:
                status = "preempted"
                run.say(f"SIGTERM received: saving checkpoint at step {step} and stopping.")
                break
    losses.read(upto=step)
    return LoopEnd(state, step, batches_consumed, status, losses.history, last_eval)


def _log(run: Run, step: int, metrics, progress: Progress) -> None:
    """Writes and prints the metrics of ``step``, with the rates since the last line."""
    m = compute_metrics(metrics)
    m["steps_per_second"], m["tokens_per_second"] = progress.rates()
    m["learning_rate"] = float(run.optimizer.lr_at(step - 1))
    run.writer.write(step, "train", m)
    run.say(progress_line(step, run.total_steps, m, eta=progress.eta(m["steps_per_second"])))


class _Losses:
    """Each step's loss, kept on the device until it is read; ``history``: the losses read, in
    step order. Reading a non-finite loss raises ``NonFiniteLossError`` for its step (the
    first non-finite one: losses are read in order)."""

    def __init__(self, ckptr: ckpt_lib.Checkpointer, start_step: int):
        self.ckptr, self.start_step = ckptr, start_step
        self.history: list[float] = []
        self._pending: list[tuple[int, jax.Array]] = []

    def add(self, step: int, loss: jax.Array) -> None:
        self._pending.append((step, loss))

    def read(self, upto: int) -> None:
        """Reads (waits for) the losses of the steps up to ``upto``, all in one transfer."""
        ready = [(s, x) for s, x in self._pending if s <= upto]
        if not ready:
            return
        self._pending = self._pending[len(ready):]
        for (step, _), value in zip(ready, jax.device_get([x for _, x in ready]), strict=True):
            loss = float(value)
            if not math.isfinite(loss):
                raise NonFiniteLossError(_nonfinite_message(self.ckptr, loss, step,
                                                            self.start_step))
            self.history.append(loss)


class _Preemption:
    """Turns SIGTERM into a flag checked between steps."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _nonfinite_message(ckptr: ckpt_lib.Checkpointer, loss: float, step: int,
                       start_step: int) -> str:
    """The loss of step ``step`` is that of the parameters after ``step - 1`` steps: a
    checkpoint of them (saved by this run) is set aside (moved, not deleted), so that a rerun
    resumes from the last checkpoint whose parameters gave a finite loss."""
    ckptr.wait()
    bad = step - 1
    note = ""
    if bad in ckptr.all_steps():
        if bad > start_step:
            moved = ckptr.set_aside(bad)
            note = (f" The checkpoint of step {bad} (those parameters) was moved to {moved}, so "
                    "that a rerun resumes from the last good one.")
        else:
            note = f" This run resumed from the checkpoint of step {bad}, which gives this loss."
    good = [s for s in ckptr.all_steps() if s < bad]
    where = (f"The last good checkpoint is step {good[-1]} in {ckptr.directory} (kept)."
             if good else f"No good checkpoint is left in {ckptr.directory}.")
    return (f"Loss became {loss} at step {step} (the parameters after step {bad}); stopping. "
            f"{where}{note} Lower the learning rate, enable gradient clipping, or check the "
            "data.")
