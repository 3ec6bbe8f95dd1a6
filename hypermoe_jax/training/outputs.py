"""The directories a run writes to: a run that fails removes those it created while they are
still empty, so bad input leaves no empty model or output directory behind.

Only directories are removed, only empty ones, and only ones that did not exist before the run
(a directory that existed, or one that holds a file -- a checkpoint, metrics, predictions -- is
kept, with its parents).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def _first_missing(path: Path) -> Path | None:
    """The top-most directory of ``path`` (itself or a parent) that does not exist yet."""
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _remove_empty(root: Path) -> None:
    """Removes the empty directories under ``root`` (bottom up) and ``root`` if it is left
    empty; ``os.rmdir`` refuses anything that holds a file."""
    if not root.is_dir() or root.is_symlink():
        return
    for dirpath, _, _ in os.walk(root, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


@contextlib.contextmanager
def removed_if_failed(*dirs: str | os.PathLike) -> Iterator[None]:
    """Runs the body; if it raises, removes the directories among ``dirs`` and their parents
    that it created and left empty (see the module docstring)."""
    new = [m for m in (_first_missing(Path(d).absolute()) for d in dirs) if m is not None]
    try:
        yield
    except BaseException:
        for root in new:
            _remove_empty(root)
        raise
