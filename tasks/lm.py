"""Language modelling on the standard corpora, read from local files (decoder-only: ``targets``).

- ``enwik8_lm``: the raw ``enwik8`` file (10^8 bytes of a Wikipedia XML dump, unzipped), bytes.
- ``text8_lm``: the raw ``text8`` file (10^8 characters ``[a-z ]``), bytes.
  Both split in order 90M / 5M / 5M (train / validation / test) as is standard.
- ``wikitext103_lm``: a directory with ``wiki.train.tokens``, ``wiki.valid.tokens``,
  ``wiki.test.tokens`` (WikiText-103 v1), T5's sentencepiece vocabulary; blank lines dropped.

Paths: ``$HYPERMOE_ENWIK8``, ``$HYPERMOE_TEXT8``, ``$HYPERMOE_WIKITEXT103``, or in gin::

    hypermoe_jax.data.cache.local_corpus_paths.enwik8 = '/data/enwik8'

Examples are consecutive pieces of ``TASK_FEATURE_LENGTHS['targets']`` tokens of the corpus
(no padding inside a piece, no EOS); evaluate with the eval loss (bits per byte = loss / ln 2).
"""

from __future__ import annotations

import os

import tensorflow as tf

from hypermoe_jax.data import cache, text
from tasks import common, sources
from tasks import preprocessors as pp

ENV = cache.LOCAL_CORPUS_ENV
WIKITEXT_FILES = {"train": "wiki.train.tokens", "validation": "wiki.valid.tokens",
                  "test": "wiki.test.tokens"}


def _corpus_path(name: str) -> str:
    path = cache.local_corpus_paths()[name]
    hint = {
        "enwik8": "the unzipped enwik8 file (http://mattmahoney.net/dc/enwik8.zip)",
        "text8": "the unzipped text8 file (http://mattmahoney.net/dc/text8.zip)",
        "wikitext103": "the directory of wiki.{train,valid,test}.tokens (WikiText-103 v1)",
    }[name]
    if not path:
        raise FileNotFoundError(
            f"{name}_lm needs {hint}. Set {ENV[name]}=/path/to/it or bind "
            f"hypermoe_jax.data.cache.local_corpus_paths.{name} in gin. Offline, wiki_char_lm and "
            "wiki_text8_lm (python -m hypermoe_jax.data fetch wiki) are the same formats on a "
            "small sample.")
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"{name}_lm: {path} (from {ENV[name]} or gin) does not exist; "
                                f"it should be {hint}.")
    return path


def _byte_range(name: str):
    def resolve(split: str) -> tuple[str, int, int]:
        path = _corpus_path(name)
        start, end = text.split_ranges(tf.io.gfile.stat(path).length)[split]
        return path, start, end

    return resolve


def _wikitext_files(split: str) -> list[str]:
    return [os.path.join(_corpus_path("wikitext103"), WIKITEXT_FILES[split])]


def byte_lm_preprocessors():
    return [pp.text_to_targets, pp.tokenize_no_copy, pp.concat_and_split]


for _name in ("enwik8", "text8"):
    common.add_task(
        f"{_name}_lm",
        source=sources.ByteChunkSource(_byte_range(_name)),
        preprocessors=byte_lm_preprocessors(),
        output_features=common.lm_features(common.BYTE_VOCAB),
        metric_fns=[],
    )

common.add_task(
    "wikitext103_lm",
    source=sources.TextLineSource(_wikitext_files),
    preprocessors=[pp.drop_empty_text, pp.text_to_targets, pp.tokenize_no_copy,
                   pp.concat_and_split],
    output_features=common.lm_features(common.T5_VOCAB),
    metric_fns=[],
)
