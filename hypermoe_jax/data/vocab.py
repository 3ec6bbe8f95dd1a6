"""Vocabularies of the seqio tasks.

- :func:`t5_vocabulary`: T5's sentencepiece model (32k pieces + 100 sentinel ids) for C4, GLUE,
  SuperGLUE, SQuAD, CNN/DailyMail and WikiText-103. The model file is looked up when first used:
  an explicit ``path``, else the gin binding ``t5_sentencepiece_path.path``, else
  ``$HYPERMOE_T5_SPM``, else T5's public ``gs://`` path (not reachable offline).
- :func:`byte_vocabulary`: UTF-8 bytes (``seqio.ByteVocabulary``: pad 0, eos 1, unk 2, byte b ->
  b + 3; 259 ids) for the character-level tasks (enwik8, text8, wiki_char_lm, wiki_text8_lm).
- :func:`offline_vocabulary`: a sentencepiece model trained here, on the training splits of the
  offline word-level corpora (SOTU + Shakespeare, see :mod:`hypermoe_jax.data.catalog`), shared
  by all offline word-level tasks so that a model pretrained on one can be fine-tuned on another.
  8,000 pieces + 100 sentinel ids. Training takes ~15 s once; the model is cached under
  ``<cache>/vocab/`` keyed by a hash of its training text and options, and training is
  deterministic (one thread), so hosts that train it independently get identical models.

:func:`train_sentencepiece` trains (or reuses) a model for any text.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import gin
import seqio

from hypermoe_jax.data.cache import cache_dir
from hypermoe_jax.data.catalog import require

T5_SPM_ENV = "HYPERMOE_T5_SPM"
T5_SPM_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
T5_EXTRA_IDS = 100
OFFLINE_VOCAB_SIZE = 8000
OFFLINE_EXTRA_IDS = 100
OFFLINE_CORPORA = ("sotu", "shakespeare")


@gin.configurable
def t5_sentencepiece_path(path: str | None = None) -> str:
    """Where T5's sentencepiece model is: ``path``, ``$HYPERMOE_T5_SPM``, or T5's gs:// path."""
    return path or os.environ.get(T5_SPM_ENV) or T5_SPM_PATH


class LazySentencePieceVocabulary(seqio.SentencePieceVocabulary):
    """A ``seqio.SentencePieceVocabulary`` whose model file is found (or trained) on first use.

    ``resolve`` returns the model path; it runs when the model is first needed, so tasks can be
    registered at import time before the file exists, and a missing file gives ``resolve``'s
    clear error instead of a failure at import. ``key`` (cheap; default: none) names where the
    model comes from (the configured path, the cache directory); when it changes, the model is
    resolved and loaded again.
    """

    def __init__(self, resolve: Callable[[], str], extra_ids: int = 0, name: str = "spm",
                 key: Callable[[], str] | None = None):
        self._resolve = resolve
        self._key_fn = key
        self._key = None
        self._name = name
        super().__init__(sentencepiece_model_file="", extra_ids=extra_ids)

    def _check_key(self) -> None:
        key = self._key_fn() if self._key_fn else None
        if key != self._key:
            self._key = key
            self._sentencepiece_model_file = ""
            self._model = None

    @property
    def sentencepiece_model_file(self) -> str:
        self._check_key()
        if not self._sentencepiece_model_file:
            self._sentencepiece_model_file = self._resolve()
        return self._sentencepiece_model_file

    def _model_context(self):
        path = self.sentencepiece_model_file
        if self._model:
            return self._model
        try:
            return super()._model_context()
        except Exception as e:  # tf.io.gfile raises several types (NotFound, PermissionDenied...)
            self._sentencepiece_model_file = ""
            raise FileNotFoundError(
                f"Cannot read the sentencepiece model of vocabulary {self._name!r} at {path}: "
                f"{type(e).__name__}: {e}. "
                + (f"Set {T5_SPM_ENV}=/path/to/sentencepiece.model (T5's "
                   f"{T5_SPM_PATH}, copied locally) or bind "
                   "hypermoe_jax.data.vocab.t5_sentencepiece_path.path in gin."
                   if self._name == "t5" else "")
            ) from e

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_key", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._key = None

    def __eq__(self, other):
        if isinstance(other, LazySentencePieceVocabulary):
            return (self._resolve == other._resolve and self._extra_ids == other._extra_ids
                    and self._name == other._name)
        return super().__eq__(other)

    def __hash__(self):
        return hash((self._name, self._extra_ids))

    def __repr__(self):
        return f"LazySentencePieceVocabulary(name={self._name!r}, extra_ids={self._extra_ids})"


def t5_vocabulary(path: str | None = None, extra_ids: int = T5_EXTRA_IDS) -> seqio.Vocabulary:
    """T5's sentencepiece vocabulary; the model path as :func:`t5_sentencepiece_path` says."""
    if path:
        return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
    return LazySentencePieceVocabulary(t5_sentencepiece_path, extra_ids=extra_ids, name="t5",
                                       key=t5_sentencepiece_path)


def byte_vocabulary(extra_ids: int = 0) -> seqio.ByteVocabulary:
    """UTF-8 bytes: pad 0, eos 1, unk 2, byte ``b`` -> ``b + 3``; 259 ids (+ ``extra_ids``)."""
    return seqio.ByteVocabulary(extra_ids=extra_ids)


# ---------------------------------------------------------------------------------------------
# Local sentencepiece training
# ---------------------------------------------------------------------------------------------

_SPM_OPTIONS = dict(
    model_type="unigram",
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1,  # the ids seqio and T5 assume
    character_coverage=0.9999,
    input_sentence_size=0, shuffle_input_sentence=False,
    max_sentence_length=16384,
    hard_vocab_limit=False,  # small corpora (tests) give fewer pieces instead of failing
    num_threads=1,  # the result depends on the thread count: fix it, so every host agrees
    byte_fallback=False,
)


def _training_lines(files: Iterable[str | os.PathLike]) -> list[str]:
    lines = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            lines.extend(x.rstrip("\n") for x in fh if x.strip())
    return lines


def train_sentencepiece(files: Sequence[str | os.PathLike], vocab_size: int,
                        out_dir: str | os.PathLike, name: str = "spm", **options) -> Path:
    """Trains a sentencepiece model on the non-empty lines of ``files`` (or reuses the one trained
    before on identical text and options) and returns the ``.model`` path.

    The model lives in ``out_dir/<name>-<hash>/sentencepiece.model`` where the hash covers the
    training text, ``vocab_size``, the options and the sentencepiece version; it is written
    atomically, so concurrent trainers are safe (they write the same bytes).
    """
    import sentencepiece as spm

    opts = {**_SPM_OPTIONS, **options, "vocab_size": int(vocab_size)}
    lines = _training_lines(files)
    if not lines:
        raise ValueError(f"no text to train a sentencepiece model on in {list(map(str, files))}")
    h = hashlib.sha256()
    h.update(json.dumps({**opts, "sentencepiece": spm.__version__}, sort_keys=True).encode())
    for line in lines:
        h.update(line.encode("utf-8"))
        h.update(b"\n")
    target = Path(out_dir) / f"{name}-{h.hexdigest()[:16]}" / "sentencepiece.model"
    if target.is_file():
        return target
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf,
                                   minloglevel=2, **opts)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, target)
    return target


def offline_sentencepiece_path(vocab_size: int = OFFLINE_VOCAB_SIZE) -> str:
    """The shared offline model (trained on first call), from the current cache."""
    dirs = [require(name) for name in OFFLINE_CORPORA]
    files = [d / "train.txt" for d in dirs]
    return str(train_sentencepiece(files, vocab_size, cache_dir() / "vocab", name="offline"))


def _cache_key() -> str:
    return str(cache_dir())


@functools.cache
def offline_vocabulary(vocab_size: int = OFFLINE_VOCAB_SIZE,
                       extra_ids: int = OFFLINE_EXTRA_IDS) -> LazySentencePieceVocabulary:
    """The vocabulary of the offline word-level tasks (one instance per arguments)."""
    return LazySentencePieceVocabulary(
        functools.partial(offline_sentencepiece_path, vocab_size), extra_ids=extra_ids,
        name="offline", key=_cache_key)
