"""Dataset builders: each turns the downloaded registry artifacts into the files of one dataset.

``build_<name>(paths, out) -> stats`` reads the artifacts at ``paths`` (in the order of the
dataset's artifacts, see :mod:`hypermoe_jax.data.catalog`) and writes the dataset's files under
``out``; the stats go into ``info.json``.

Word-level files (``sotu``, ``shakespeare``) hold one passage (a paragraph, long ones cut at
sentence ends) per line and an empty line after each document; LM tasks turn an empty line into
an end-of-sequence token. Documents are assigned whole to a split. Sentiment files hold
``label<TAB>text`` lines; examples are de-duplicated and split 80/10/10 by a hash of the text.
Every split is a pure function of the downloaded files, so all hosts of a multi-host run that
fetch independently build identical files.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import tarfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hypermoe_jax.data.cache import FetchError, atomic_write
from hypermoe_jax.data.registry import (
    RT_MEMBER,
    SHAKESPEARE_GLOB,
    SOTU_GLOB,
    UCI_MEMBERS,
    WIKI_MEMBER,
)
from hypermoe_jax.data.text import clean_line, passages, split_by_hash, split_bytes, wikifil

WORD_FRACTIONS = (0.9, 0.05, 0.05)
LABEL_FRACTIONS = (0.8, 0.1, 0.1)
# Sanity checks on what the packages hold (actual: 233 addresses, 42 works, 12,752 and 2,982
# distinct labelled examples).
EXPECTED_MIN = {"sotu": 200, "shakespeare": 30, "rotten_tomatoes": 10000, "uci": 2500}


def _write_documents(out: Path, docs: Mapping[str, str]) -> dict:
    """Word-level files: passages one per line, an empty line after each document."""
    assign = split_by_hash(docs, WORD_FRACTIONS, weight=len)
    stats = {}
    for split, names in assign.items():
        lines = []
        for name in sorted(names):
            lines.extend(passages(docs[name]))
            lines.append("")
        atomic_write(out / f"{split}.txt", "\n".join(lines) + "\n")
        stats[split] = {"documents": sorted(names), "passages": sum(1 for x in lines if x)}
    return stats


def _write_labelled(out: Path, examples: Mapping[str, str]) -> dict:
    """``label<TAB>text`` files from {text: label}, split by a hash of the text."""
    assign = split_by_hash(examples, LABEL_FRACTIONS)
    stats = {}
    for split, texts in assign.items():
        atomic_write(out / f"{split}.tsv",
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
    atomic_write(out / "enwik8_sample.xml", raw)
    text = wikifil(raw)
    for split, chunk in split_bytes(raw).items():
        atomic_write(out / "char" / f"{split}.raw", chunk)
    for split, chunk in split_bytes(text).items():
        atomic_write(out / "text8" / f"{split}.txt", chunk)
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
