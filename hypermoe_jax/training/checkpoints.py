"""Orbax checkpoints of the train state: async, keep-N, exact resume.

A checkpoint at step ``n`` holds the full ``TrainState`` (step, params, optimizer state, the
non-trainable ``frozen`` collection, rng) and a JSON record with the data position (batches
consumed) and run metadata, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from hypermoe_jax.training.errors import CheckpointMismatchError, RunError
from hypermoe_jax.training.state import TrainState


@contextlib.contextmanager
def _absl_level(level: int):
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(old)


def _sync_processes(name: str) -> None:
    """A barrier of all processes (nothing on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _reason(error: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters of it)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200] if lines else ''}"


def _shapes_by_path(tree) -> dict[str, tuple | None]:
    return {jax.tree_util.keystr(k): getattr(v, "shape", None)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _tree_diff(target, found) -> tuple[list[str], list[str], list[str]]:
    """(paths missing in ``found``, paths only in ``found``, paths whose shapes differ)."""
    tgt, got = _shapes_by_path(target), _shapes_by_path(found)
    missing = sorted(set(tgt) - set(got))
    unexpected = sorted(set(got) - set(tgt))
    differ = [k for k in sorted(set(tgt) & set(got)) if tuple(tgt[k] or ()) != tuple(got[k] or ())]
    return missing, unexpected, differ


def _describe_mismatch(target, found, *, ignore_missing: bool = False) -> str:
    tgt, got = _shapes_by_path(target), _shapes_by_path(found)
    missing, unexpected, differ = _tree_diff(target, found)
    lines = []
    if not ignore_missing:
        lines += [f"  missing in checkpoint: {k} {tgt[k]}" for k in missing[:5]]
    lines += [f"  not in model: {k} {got[k]}" for k in unexpected[:5]]
    lines += [f"  shape differs at {k}: model {tgt[k]} vs checkpoint {got[k]}"
              for k in differ[:10]]
    return "\n".join(lines)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager`` (items ``state`` and ``meta``)."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: TrainState, meta: dict[str, Any], force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=force,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def set_aside(self, step: int) -> Path:
        """Moves checkpoint ``step`` out of the managed directory (to ``<directory>_set_aside/
        <step>``, kept, never deleted), so that the latest checkpoint is the one before it.
        Process 0 moves it; every process returns where it went."""
        self.manager.wait_until_finished()
        dest_root = self.directory.parent / f"{self.directory.name}_set_aside"
        _sync_processes(f"set_aside_{step}_look")
        dest, n = dest_root / str(step), 0
        while dest.exists():
            n += 1
            dest = dest_root / f"{step}.{n}"
        _sync_processes(f"set_aside_{step}_name")
        if jax.process_index() == 0:
            dest_root.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), dest)
        _sync_processes(f"set_aside_{step}_moved")
        self.manager.reload()
        return dest

    def restore(self, abstract_state: TrainState, step: int | None = None):
        """Restores ``(state, meta)``; ``abstract_state`` gives structure, shapes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}")
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointMismatchError(
                f"Checkpoint {self.directory}/{step} does not match the model: {e}\n(If the "
                f"model is the one it was saved from, the checkpoint may be damaged: move it out "
                f"of {self.directory} to resume from the one before it.)"
            ) from e
        return restored.state, restored.meta

    def restore_latest(self, abstract_state: TrainState, warn: Callable[[str], None]
                       ) -> tuple[TrainState, dict[str, Any]] | None:
        """``(state, meta)`` of the latest checkpoint that restores; None when there is none.

        A checkpoint that fails to restore while an earlier one of the same run restores is
        damaged (a truncated or missing file; a model that does not fit would fail on both): it
        is set aside (``set_aside``: kept), with one line to ``warn`` naming it, and the run
        resumes from the earlier one. When none restores, nothing is moved and the latest
        one's error is raised (a ``RunError`` saying what to do, unless it is a
        ``CheckpointMismatchError``).
        """
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                state, meta = self.restore(abstract_state, step)
            except Exception as e:  # any failure: whether an earlier one restores decides
                failed.append((step, e))
                continue
            for bad, error in failed:
                moved = self.set_aside(bad)
                warn(f"Checkpoint {self.directory}/{bad} cannot be restored ({_reason(error)}); "
                     f"moved it to {moved} and resuming from step {step}.")
            return state, meta
        if not failed:
            return None
        step, error = failed[0]
        if isinstance(error, CheckpointMismatchError):
            raise error
        raise RunError(
            f"Checkpoint {self.directory}/{step} cannot be restored ({_reason(error)}). If it is "
            f"damaged, move it out of {self.directory}: the run then resumes from the one before "
            "it (or starts afresh).") from error

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(path: str | os.PathLike, abstract_params, abstract_mutables=None, *,
                   fallback_params=None, fallback_mutables=None):
    """Loads only ``params`` (and ``flax_mutables``) from a checkpoint step directory or a run
    directory (latest step), for fine-tuning from a pretrained checkpoint.

    Raises ``CheckpointMismatchError`` naming the differing parameters when the trees do not
    match. With ``fallback_params`` (and ``fallback_mutables``) -- freshly initialised values of
    the same trees -- parameters the checkpoint lacks keep those values instead (e.g. a HyperMoE
    model fine-tuned from a Switch checkpoint: the HyperExpert generator starts from its
    initialisation); parameters only in the checkpoint, or of another shape, are still errors.
    Returns ``(params, mutables, missing)``: ``missing`` lists the paths that kept their
    initialisation.
    """
    path = Path(path).absolute()
    if not path.exists():
        raise FileNotFoundError(f"INITIAL_CHECKPOINT_PATH {path} does not exist.")
    if (path / "state").is_dir():
        state_dir = path / "state"
    else:
        steps = sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())
        if not steps:
            raise FileNotFoundError(
                f"{path} holds no checkpoint (expected a step directory like {path}/1000 or a "
                "run directory containing step directories)."
            )
        state_dir = path / str(steps[-1]) / "state"
    ckptr = ocp.StandardCheckpointer()
    with _absl_level(logging.ERROR):  # the step's metadata file is one level up: not a problem
        meta = ckptr.metadata(state_dir)
    tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
    found = {"params": tree["params"], "flax_mutables": tree.get("flax_mutables") or {}}
    target = {"params": abstract_params, "flax_mutables": abstract_mutables or {}}
    allow_missing = fallback_params is not None
    problems = _describe_mismatch(target, found, ignore_missing=allow_missing)
    if problems:
        hint = "" if allow_missing else (
            " If the model adds parameters to the checkpoint's architecture (e.g. HyperMoE "
            "fine-tuned from Switch), set INITIAL_CHECKPOINT_ALLOW_MISSING = True to initialise "
            "them from scratch.")
        raise CheckpointMismatchError(
            f"Checkpoint {state_dir} does not match the model:\n{problems}\n"
            "Check that the model gin (sizes, number of experts, variant) matches the one the "
            f"checkpoint was trained with.{hint}"
        )
    missing, _, _ = _tree_diff(target, found)
    full = ckptr.restore(state_dir)
    loaded = {"params": full["params"], "flax_mutables": full.get("flax_mutables") or {}}
    fallback = {"params": fallback_params, "flax_mutables": fallback_mutables or {}}
    loaded_by_path = {jax.tree_util.keystr(k): v
                      for k, v in jax.tree_util.tree_leaves_with_path(loaded)}

    def pick(key_path, abstract, fb=None):
        key = jax.tree_util.keystr(key_path)
        value = loaded_by_path[key] if key in loaded_by_path else fb
        return jax.device_put(value, getattr(abstract, "sharding", None))

    if allow_missing:
        merged = jax.tree_util.tree_map_with_path(pick, target, fallback)
    else:
        merged = jax.tree_util.tree_map_with_path(pick, target)
    return merged["params"], merged["flax_mutables"], missing
