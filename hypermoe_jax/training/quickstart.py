"""The quickstart: fetch real text, train a tiny HyperMoE LM on it, evaluate the checkpoint.

    python -m hypermoe_jax.quickstart [--model_dir=runs/quickstart] [--gin.TRAIN_STEPS=300 ...]

1. Fetches the Wikipedia sample (``python -m hypermoe_jax.data fetch wiki``: the gensim==4.4.0
   wheel from PyPI, ~28 MB, into ``$HYPERMOE_CACHE`` or ``~/.cache/hypermoe_jax``).
2. Trains ``gin/experiments/quickstart_wiki_char.gin`` (a 4-layer HyperMoE LM, 4 experts, on
   the bytes of the text), printing loss, bits per character and expert usage; writes an orbax
   checkpoint under ``<model_dir>/checkpoints``. A second call resumes from that checkpoint.
3. Evaluates the checkpoint on the held-out test split with ``runs/eval.gin``: bits per
   character and per-layer expert usage, written to ``<model_dir>/eval/eval_metrics.json``.

Extra ``--gin.NAME=VALUE`` / ``--gin_file=...`` flags go to both runs (e.g. ``--gin.TRAIN_STEPS``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hypermoe_jax.data import catalog
from hypermoe_jax.data.cache import DataError

EXPERIMENT = "experiments/quickstart_wiki_char.gin"
MODEL_GIN = "models/hypermoe_lm_tiny.gin"  # the model gin the experiment includes
EVAL_DATA_MACROS = ("MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS", "BATCH_SIZE")


def _parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model_dir", default="runs/quickstart",
                   help="where checkpoints, metrics and the evaluation go")
    p.add_argument("--skip_eval", action="store_true", help="train only")
    return p.parse_known_args(list(argv))


def _bindings(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    from hypermoe_jax.training import gin_utils

    files, bindings, _, rest = gin_utils.parse_gin_args(extra)
    if rest:
        raise SystemExit(f"Unrecognised arguments: {rest}")
    return files, bindings


def _gin_run(files: Sequence[str], bindings: Sequence[str], macros: Sequence[str] = ()):
    """Runs the configured run function; returns its result and the values of ``macros``."""
    import gin

    from hypermoe_jax.training import cli, gin_utils

    gin.clear_config()
    gin_utils.parse(list(files), list(bindings))
    try:
        values = {name: gin.query_parameter(f"%{name}") for name in macros}
        return cli.run(), values
    finally:
        gin.clear_config()


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parse_args(sys.argv[1:] if argv is None else argv)
    from hypermoe_jax.training import cli

    cli.quiet_tensorflow()
    t0 = time.time()
    try:
        wiki = catalog.fetch("wiki", verbose=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Data: {wiki} ({time.time() - t0:.0f} s)")

    from hypermoe_jax.training import errors

    model_dir = Path(args.model_dir).absolute()
    extra_files, extra_bindings = _bindings(extra)
    try:
        summary, data_macros = _gin_run(
            [EXPERIMENT, *extra_files], [f"MODEL_DIR = {str(model_dir)!r}", *extra_bindings],
            macros=EVAL_DATA_MACROS)
    except errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    losses = summary["losses"]
    if losses:
        print(f"Trained to step {summary['step']} ({summary['status']}): loss "
              f"{losses[0]:.3f} -> {losses[-1]:.3f}; checkpoint in {summary['checkpoint_dir']}")
    else:
        print(f"{summary['checkpoint_dir']} already holds step {summary['step']}: nothing to "
              f"train (use another --model_dir for a new run).")
    if summary["status"] != "done" or args.skip_eval:
        return 0

    eval_dir = model_dir / "eval"
    try:
        result, _ = _gin_run(
            [MODEL_GIN, "runs/eval.gin", *extra_files],
            [
                f"CHECKPOINT_PATH = {summary['checkpoint_dir']!r}",
                f"EVAL_OUTPUT_DIR = {str(eval_dir)!r}",
                # The training run's task, lengths and batch size.
                *[f"{name} = {value!r}" for name, value in data_macros.items()],
                "EVAL_SPLIT = 'test'",
                "EVAL_STEPS = 32",  # 131k of the 304k test characters
                *[b for b in extra_bindings if not b.startswith("TRAIN_STEPS")],
            ],
        )
    except errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Test split: {result['bits_per_token']:.3f} bits per character "
          f"(loss {result['loss']:.3f}); metrics in {eval_dir / 'eval_metrics.json'}")
    print(f"Quickstart finished in {(time.time() - t0) / 60:.1f} min.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
