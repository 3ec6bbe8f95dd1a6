"""The local cache: where it is, the errors of this package, atomic file writes, and where the
standard corpora that users download themselves are."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import gin

CACHE_ENV = "HYPERMOE_CACHE"


class DataError(RuntimeError):
    """Base class of this package's errors."""


class FetchError(DataError):
    """A registry client failed, or what it fetched is not what was expected."""


class DataMissingError(DataError, FileNotFoundError):
    """A dataset is not in the cache yet."""


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache root: ``path``, else ``$HYPERMOE_CACHE``, else ``~/.cache/hypermoe_jax``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/hypermoe_jax").expanduser()


# Standard corpora that users download themselves (enwik8_lm, text8_lm, wikitext103_lm).
LOCAL_CORPUS_ENV = {"enwik8": "HYPERMOE_ENWIK8", "text8": "HYPERMOE_TEXT8",
                    "wikitext103": "HYPERMOE_WIKITEXT103"}


@gin.configurable
def local_corpus_paths(enwik8: str | None = None, text8: str | None = None,
                       wikitext103: str | None = None) -> dict[str, str | None]:
    """Where the standard corpora are: gin bindings, else ``$HYPERMOE_ENWIK8`` (the unzipped
    ``enwik8`` file), ``$HYPERMOE_TEXT8`` (``text8``), ``$HYPERMOE_WIKITEXT103`` (the directory of
    ``wiki.{train,valid,test}.tokens``)."""
    given = {"enwik8": enwik8, "text8": text8, "wikitext103": wikitext103}
    return {k: v or os.environ.get(LOCAL_CORPUS_ENV[k]) for k, v in given.items()}


# ---------------------------------------------------------------------------------------------
# Writing (atomic)
# ---------------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes | str) -> None:
    """Writes ``data`` (str as UTF-8) to a temporary name next to ``path``, then renames it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
