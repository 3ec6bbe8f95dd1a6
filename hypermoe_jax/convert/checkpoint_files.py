"""What the converters write: a parameters-only orbax checkpoint, model / fine-tuning gin files and
a JSON record of the conversion.

A converted folder ``DEST``::

    DEST/checkpoint/state/      orbax: {'params': ..., 'flax_mutables': {}}, what
                                INITIAL_CHECKPOINT_PATH (training.checkpoints.restore_params) reads
    DEST/model.gin              the model (for runs/*.gin or t5x/runs/*.gin)
    DEST/finetune.gin           model.gin + runs/finetune.gin + INITIAL_CHECKPOINT_PATH
    DEST/t5x_model.gin          model.gin for the upstream T5X binaries
    DEST/t5x/checkpoint_0/      (--t5x_checkpoint) a T5X train state for t5x.train fine-tuning
    DEST/conversion.json        source, settings, parameters missing from / unused in the source

``DEST`` must be new or empty: nothing already there is overwritten unless asked.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np


def prepare_destination(dest: str | Path, overwrite: bool) -> Path:
    """``dest`` as an absolute path, created; an error if it holds files (unless ``overwrite``,
    which empties it first)."""
    dest = Path(dest).absolute()
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} is a file; pass a new or empty directory as DEST.")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{dest} is not empty; pass a new or empty directory (or --overwrite to replace "
                "what is there).")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def save_params(dest: Path, params: Mapping, mutables: Mapping | None = None) -> Path:
    """Writes ``{'params', 'flax_mutables'}`` as an orbax checkpoint at ``dest/checkpoint/state``
    and returns ``dest/checkpoint`` (an ``INITIAL_CHECKPOINT_PATH``)."""
    import orbax.checkpoint as ocp

    state = {"params": jax.tree.map(np.asarray, dict(params)),
             "flax_mutables": jax.tree.map(np.asarray, dict(mutables or {}))}
    ckpt = dest / "checkpoint"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(ckpt / "state", state)
    checkpointer.wait_until_finished()
    return ckpt


def _gin_value(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):
        return "(" + "".join(f"{_gin_value(v)}, " for v in value).rstrip(" ") + ")"
    return repr(value)


def gin_block(selector: str, bindings: Mapping[str, Any]) -> list[str]:
    return [f"{selector}:"] + [f"  {k} = {_gin_value(v)}" for k, v in bindings.items()]


def write_gin_files(
    dest: Path,
    *,
    header: Sequence[str],
    imports: Sequence[str],
    macros: Mapping[str, Any],
    blocks: Sequence[tuple[str, Mapping[str, Any]]],
    allow_missing: bool,
) -> dict[str, Path]:
    """``model.gin`` (the architecture gin + these macros and bindings), ``finetune.gin`` and
    ``t5x_model.gin`` in ``dest``; returns their paths by name."""
    lines = [f"# {h}" if h else "#" for h in header]
    lines += ["include 'models/architectures/encoder_decoder.gin'", "",
              "from __gin__ import dynamic_registration"]
    lines += [f"from {m.rsplit('.', 1)[0]} import {m.rsplit('.', 1)[1]}" for m in imports]
    lines.append("")
    lines += [f"{k} = {_gin_value(v)}" for k, v in macros.items()]
    for selector, bindings in blocks:
        lines += [""] + gin_block(selector, bindings)
    model = dest / "model.gin"
    model.write_text("\n".join(lines) + "\n")
    ckpt = dest / "checkpoint"
    finetune = dest / "finetune.gin"
    finetune.write_text("\n".join([
        f"# Fine-tunes the model of {model.name} from the converted checkpoint with this "
        "project's trainer:",
        f"#   python -m hypermoe_jax.train --gin_file={finetune} \\",
        "#     --gin.MODEL_DIR=... --gin.MIXTURE_OR_TASK_NAME=... "
        "\"--gin.TASK_FEATURE_LENGTHS={...}\" --gin.TRAIN_STEPS=... --gin.BATCH_SIZE=...",
        f"include '{model}'",
        "include 'runs/finetune.gin'",
        "",
        f"INITIAL_CHECKPOINT_PATH = '{ckpt}'",
        "# Parameters the source checkpoint lacks (e.g. HyperMoE's generator) start from their",
        "# initialisation.",
        f"INITIAL_CHECKPOINT_ALLOW_MISSING = {allow_missing}",
    ]) + "\n")
    t5x = dest / "t5x_model.gin"
    t5x.write_text("\n".join([
        f"# The model of {model.name} for the upstream T5X binaries, e.g.",
        "#   python -m t5x.train --gin_search_paths=GIN_DIR --gin_file=" + str(t5x) + " \\",
        "#     --gin_file=t5x/runs/finetune.gin "
        f"--gin.INITIAL_CHECKPOINT_PATH=\\'{dest / 't5x' / 'checkpoint_0'}\\' ...",
        "# (GIN_DIR: this project's gin directory; the T5X checkpoint is written by the",
        "# converter's --t5x_checkpoint.)",
        f"include '{model}'",
        "include 't5x/architectures/encoder_decoder.gin'",
    ]) + "\n")
    return {"model": model, "finetune": finetune, "t5x_model": t5x}


def write_record(dest: Path, record: Mapping[str, Any]) -> Path:
    path = dest / "conversion.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
