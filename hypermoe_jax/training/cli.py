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

TensorFlow (seqio's data pipeline) only reads data: it is kept off the GPUs, which are JAX's, and
its C++ logging is at ``TF_CPP_MIN_LOG_LEVEL`` (default 2: errors only).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import gin

# No `import jax` here: ``main`` first sets up TensorFlow (``quiet_tensorflow``), and importing JAX
# sets TF_CPP_MIN_LOG_LEVEL to 1 where the user left it unset.
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
        import jax

        jax.distributed.initialize()
    return rest


# A record of TensorFlow's C++ logging (absl's format, or TF's older one) and its severity.
_TF_LOG_RECORD = re.compile(
    r"^(?:(?P<absl>[IWEF])\d{4} \d\d:\d\d:\d+\.\d+ +\d+ [^\]\s]+\]"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: (?P<tf>[IWEF]) [^\]\s]+\]"
    r"|(?P<preinit>WARNING): All log messages before absl::InitializeLog\(\))")
_TF_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3, "WARNING": 1}
# What Python writes to stderr on its own: a traceback, a warning.
_PYTHON_RECORD = re.compile(
    r"^(?:Traceback \(most recent call last\)|\S.*:\d+: \w*(?:Warning|Error):)")


def _filter_tf_log(text: str, min_level: int, drop_cuinit: bool) -> str:
    """``text`` (what TensorFlow wrote to stderr) without its C++ log records below
    ``min_level`` (0 INFO, 1 WARNING, 2 ERROR, 3 FATAL) -- and with ``drop_cuinit``, without the
    failed ``cuInit`` of a machine with no CUDA driver -- each with its continuation lines."""
    out, keep = [], True
    for line in text.splitlines(keepends=True):
        if m := _TF_LOG_RECORD.match(line):
            severity = _TF_SEVERITY[m.group("absl") or m.group("tf") or m.group("preinit")]
            keep = severity >= min_level and not (drop_cuinit and "cuInit" in line)
        elif _PYTHON_RECORD.match(line):
            keep = True
        if keep:
            out.append(line)
    return "".join(out)


@contextlib.contextmanager
def _filtered_stderr(min_level: int, drop_cuinit: bool):
    """What is written to stderr (file descriptor 2: C++ code, and Python's ``sys.stderr``)
    inside the block, passed through ``_filter_tf_log`` at its end: TensorFlow logs as it loads,
    before it reads ``TF_CPP_MIN_LOG_LEVEL``."""
    stream = sys.stderr
    try:
        stream.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = _filter_tf_log(captured.read().decode(errors="replace"), min_level,
                                  drop_cuinit)
            if kept:
                stream.write(kept)
                stream.flush()


def quiet_tensorflow(env: MutableMapping[str, str] | None = None) -> None:
    """Imports TensorFlow (seqio's data pipeline; imported by the gin files' ``import tasks``)
    with its C++ logging at ``TF_CPP_MIN_LOG_LEVEL`` -- default 2 (errors only; then the failed
    ``cuInit`` of a machine without a CUDA driver is dropped too) -- and hides the GPUs from it:
    TensorFlow only reads data here, and the GPUs are JAX's (whose devices stay as they are)."""
    env = os.environ if env is None else env
    user_level = env.get("TF_CPP_MIN_LOG_LEVEL")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        min_level = int(env["TF_CPP_MIN_LOG_LEVEL"])
    except ValueError:
        min_level = 0
    with _filtered_stderr(min_level, drop_cuinit=user_level is None):
        import tensorflow as tf

        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow ran before (its devices are fixed): nothing to hide
            pass


COMPILATION_CACHE_ENV = "HYPERMOE_COMPILATION_CACHE"
COMPILATION_CACHE_MAX_BYTES = 4 << 30
_OFF = ("", "0", "off", "none", "false", "no")


def compilation_cache(env: Mapping[str, str] | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache for this process (as MaxText does) and returns
    its directory: ``$HYPERMOE_COMPILATION_CACHE``, else ``<$HYPERMOE_CACHE or
    ~/.cache/hypermoe_jax>/xla``; ``HYPERMOE_COMPILATION_CACHE=0`` turns it off. A second run of a
    model (a resume, a rerun, eval after train) loads its compiled steps instead of compiling them
    again. Where the user configured JAX's own cache (``JAX_COMPILATION_CACHE_DIR``) that one
    is kept. The cache holds at most ``COMPILATION_CACHE_MAX_BYTES`` (least recently used
    entries go first; processes share it under a file lock)."""
    env = os.environ if env is None else env
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    value = env.get(COMPILATION_CACHE_ENV)
    if value is not None and value.strip().lower() in _OFF:
        return None
    if not value:
        from hypermoe_jax.data.cache import CACHE_ENV, cache_dir

        value = str(cache_dir(env.get(CACHE_ENV) or None) / "xla")
    jax.config.update("jax_compilation_cache_dir", value)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_MAX_BYTES)
    return value


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    quiet_tensorflow()
    compilation_cache()
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
