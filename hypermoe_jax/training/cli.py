"""Gin-configured runs: pretrain / finetune (``train``), ``evaluate`` and ``infer``.

    python -m hypermoe_jax.train \
      --gin_file=models/hypermoe_tiny.gin --gin_file=runs/pretrain.gin \
      --gin.MODEL_DIR=/tmp/run --gin.MIXTURE_OR_TASK_NAME=wiki_char_lm ...

The run gin picks the run function (``run.fn``); models follow the T5X ``BaseTransformerModel``
protocol (``loss_fn``, ``eval_fn``, ``predict_batch_with_aux``, ``get_initial_variables``,
``FEATURE_CONVERTER_CLS``). The train state is jitted with ``NamedSharding``s on a
(data, expert, model) mesh; checkpoints are orbax (async, keep-N) and resume exactly: step,
optimizer, rng (per-step keys are ``fold_in(seed_key, step)``) and data position (batches consumed).
SIGTERM saves a checkpoint and stops; a non-finite loss stops the run, keeping the last good
checkpoint.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax

from hypermoe_jax.training import gin_utils
from hypermoe_jax.training.errors import USER_ERRORS


@gin.configurable
def run(fn: Callable[[], Any] = gin.REQUIRED):
    """The run gin binds ``run.fn`` to ``@train.train`` / ``@evaluate.evaluate`` /
    ``@evaluate.infer``."""
    if fn is gin.REQUIRED:
        raise gin_utils.GinConfigError(
            "No run function configured: include one of gin/runs/{pretrain,finetune,eval,infer}"
            ".gin (they set run.fn)."
        )
    return fn()


def _multihost_environment(env: Mapping[str, str]) -> bool:
    """Whether the environment describes one process of a multi-host job: a TPU pod slice
    (several ``TPU_WORKER_HOSTNAMES``), a SLURM job with several tasks, or an explicit
    coordinator address (``JAX_COORDINATOR_ADDRESS``)."""
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return True
    try:
        if int(env.get("SLURM_NTASKS", "1")) > 1:
            return True
    except ValueError:
        pass
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def _maybe_initialize_distributed(argv: list[str], env: Mapping[str, str] | None = None
                                  ) -> list[str]:
    """Calls ``jax.distributed.initialize()`` (before anything touches a device) with
    ``--multiprocess`` or in a multi-host environment (``_multihost_environment``);
    ``--single_process`` turns the detection off. Returns the other arguments."""
    env = os.environ if env is None else env
    flags = {"--multiprocess", "--multiprocess_gpu", "--single_process"}
    rest = [a for a in argv if a not in flags]
    multi = ("--single_process" not in argv) and (
        bool(flags.intersection(argv) - {"--single_process"}) or _multihost_environment(env))
    if multi:
        jax.distributed.initialize()
    return rest


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    argv = _maybe_initialize_distributed(argv)
    files, bindings, paths, rest = gin_utils.parse_gin_args(argv)
    if rest:
        print(f"Unrecognised arguments: {rest}", file=sys.stderr)
        return 2
    try:
        gin_utils.parse(files, bindings, paths)
        run()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
