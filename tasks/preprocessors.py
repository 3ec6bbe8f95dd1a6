"""seqio preprocessors (TF ops): T5's text-to-text formats, span corruption, LM chunking.

Text-to-text formats follow T5 (Raffel et al. 2020, appendix D):

- GLUE / SuperGLUE: ``"<benchmark> <key1>: <text1> <key2>: <text2>"`` -> the label's name; keys
  in alphabetical order unless given (MultiRC: question, answer, paragraph; WiC: sentence1,
  sentence2, word); test labels (-1) become ``"<unk>"``. STS-B: the score rounded to 0.2, as a
  string with one decimal. WSC: ``"wsc: <text with *pronoun* marked>"`` -> the candidate referent.
  ReCoRD: ``"record query: <query> entities: <e1>, <e2> passage: <passage>"`` -> an answer.
- SQuAD: ``"question: <q> context: <c>"`` -> the first answer.
- CNN/DailyMail: ``"summarize: <article>"`` -> the highlights.

Span corruption is T5's pretraining objective: random spans (mean length 3) covering 15% of the
tokens are each replaced by one sentinel in the inputs; the targets list every dropped span after
its sentinel. Sentinels are the vocabulary's last ids, counting down (``<extra_id_0>`` is
``vocab_size - 1``). Everything here is written for this project with TF ops; the ``t5`` package
is not a dependency.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

# ---------------------------------------------------------------------------------------------
# Text-to-text formats
# ---------------------------------------------------------------------------------------------


def _join(parts: Sequence, separator: str = " ") -> tf.Tensor:
    return tf.strings.join(list(parts), separator=separator)


def _label_name(label: tf.Tensor, label_names: Sequence[str]) -> tf.Tensor:
    """``label_names[label]``, or ``"<unk>"`` for the unlabelled (-1) test examples."""
    label = tf.cast(label, tf.int32)
    names = tf.constant(list(label_names))
    return tf.where(label < 0, tf.constant("<unk>"), tf.gather(names, tf.maximum(label, 0)))


@seqio.map_over_dataset
def glue(x, benchmark_name: str, label_names: Sequence[str],
         feature_names: Sequence[str] | None = None, id_key: str = "idx"):
    """``"<benchmark> key1: v1 key2: v2"`` -> label name; keeps ``idx``."""
    keys = feature_names or sorted(k for k in x if k not in ("label", id_key))
    parts = [benchmark_name]
    for k in keys:
        parts += [f"{k}:", x[k]]
    out = {"inputs": _join(parts), "targets": _label_name(x["label"], label_names)}
    if id_key in x:
        out["idx"] = x[id_key]
    return out


@seqio.map_over_dataset
def stsb(x):
    """STS-B as text: the similarity score rounded to the nearest 0.2, e.g. ``"3.4"``."""
    score = tf.round(tf.cast(x["label"], tf.float32) * 5.0) / 5.0
    return {
        "inputs": _join(["stsb sentence1:", x["sentence1"], "sentence2:", x["sentence2"]]),
        "targets": tf.strings.as_string(score, precision=1),
        "idx": x["idx"],
    }


def mark_span(text: tf.Tensor, index: tf.Tensor, span: tf.Tensor, marker: str = "*") -> tf.Tensor:
    """``text`` with the words of ``span`` starting at word ``index`` wrapped in ``marker``.

    Words are split on single spaces (as WSC's ``span2_index`` counts them); punctuation stuck to
    the last word stays outside the marker: ("He left.", 0, "He") -> "*He* left.".
    """
    words = tf.strings.split(text, " ")
    n = tf.size(tf.strings.split(span, " "))
    index = tf.cast(index, tf.int32)
    chunk = tf.strings.reduce_join(words[index:index + n], separator=" ")
    chunk_len = tf.strings.length(chunk)
    span_len = tf.minimum(tf.strings.length(span), chunk_len)
    starts_with_span = tf.equal(tf.strings.substr(chunk, 0, span_len), span)
    rest = tf.strings.substr(chunk, span_len, chunk_len - span_len)
    marked = tf.where(starts_with_span,
                      tf.strings.join([marker, span, marker, rest]),
                      tf.strings.join([marker, chunk, marker]))
    pieces = tf.concat([words[:index], tf.reshape(marked, [1]), words[index + n:]], axis=0)
    return tf.strings.reduce_join(pieces, separator=" ")


@seqio.map_over_dataset
def wsc_simple(x):
    """WSC as T5's "simple" format: ``"wsc: <text with *pronoun*>"`` -> the candidate referent
    (``span1_text``). Keeps ``label`` and ``span1_text`` for the postprocessor."""
    text = mark_span(x["text"], x["span2_index"], x["span2_text"])
    return {
        "inputs": _join(["wsc:", text]),
        "targets": x["span1_text"],
        "label": x["label"],
        "span1_text": x["span1_text"],
        "idx": x["idx"],
    }


def filter_label(dataset: tf.data.Dataset, value: int = 1) -> tf.data.Dataset:
    """Keeps examples whose ``label`` is ``value`` (WSC training: correct referents only)."""
    return dataset.filter(lambda x: tf.equal(tf.cast(x["label"], tf.int32), value))


@seqio.map_over_dataset
def record(x):
    """ReCoRD: ``"record query: ... entities: a, b passage: ..."`` -> the first answer
    (``"<unk>"`` when there is none); keeps all ``answers`` for the metric."""
    passage = tf.strings.regex_replace(x["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ")
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    entities = tf.strings.reduce_join(x["entities"], separator=", ")
    answers = x["answers"]
    target = tf.cond(tf.size(answers) > 0, lambda: answers[0], lambda: tf.constant("<unk>"))
    return {
        "inputs": _join(["record query:", x["query"], "entities:", entities, "passage:", passage]),
        "targets": target,
        "answers": answers,
        "idx": x["idx"],
    }


@seqio.map_over_dataset
def squad(x):
    """SQuAD: ``"question: <q> context: <c>"`` -> the first answer; keeps ``answers``."""
    answers = x["answers"]["text"]
    target = tf.cond(tf.size(answers) > 0, lambda: answers[0], lambda: tf.constant(""))
    return {
        "inputs": _join(["question:", x["question"], "context:", x["context"]]),
        "targets": target,
        "answers": answers,
        "id": x["id"],
    }


@seqio.map_over_dataset
def summarize(x, article_key: str = "article", summary_key: str = "highlights"):
    return {"inputs": _join(["summarize:", x[article_key]]), "targets": x[summary_key]}


@seqio.map_over_dataset
def labelled_tsv(x, prefix: str):
    """A ``label<TAB>text`` line -> ``{"inputs": "<prefix>: text", "targets": label}``."""
    line = x["text"]
    label = tf.strings.regex_replace(line, r"\t.*$", "")
    text = tf.strings.regex_replace(line, r"^[^\t]*\t", "")
    return {"inputs": _join([f"{prefix}:", text]), "targets": label}


@seqio.map_over_dataset
def text_to_targets(x, key: str = "text"):
    return {"targets": x[key]}


def drop_empty_text(dataset: tf.data.Dataset, key: str = "text") -> tf.data.Dataset:
    return dataset.filter(lambda x: tf.strings.length(tf.strings.strip(x[key])) > 0)


# ---------------------------------------------------------------------------------------------
# Language modelling: tokens of many examples -> fixed-length pieces
# ---------------------------------------------------------------------------------------------


def empty_to_eos(dataset: tf.data.Dataset, output_features: Mapping[str, seqio.Feature],
                 feature_key: str = "targets") -> tf.data.Dataset:
    """Tokenized empty lines (document ends in the offline word-level files) -> ``[eos]``."""
    eos = output_features[feature_key].vocabulary.eos_id

    def fn(x):
        t = x[feature_key]
        t = tf.cond(tf.size(t) > 0, lambda: t, lambda: tf.constant([eos], t.dtype))
        return {**x, feature_key: t}

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def reduce_concat_tokens(dataset: tf.data.Dataset, feature_key: str = "targets",
                         batch_size: int = 128) -> tf.data.Dataset:
    """Concatenates the ``feature_key`` tokens of ``batch_size`` consecutive examples; other
    features are dropped. Padding id 0 never occurs in tokens, so it marks the batch padding."""
    dataset = dataset.map(lambda x: {feature_key: x[feature_key]},
                          num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [None]})

    def flatten(x):
        t = tf.reshape(x[feature_key], [-1])
        return {feature_key: tf.boolean_mask(t, tf.not_equal(t, 0))}

    return dataset.map(flatten, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(dataset: tf.data.Dataset, max_tokens_per_segment: int,
                 feature_key: str = "targets") -> tf.data.Dataset:
    """Cuts each example's tokens into consecutive pieces of ``max_tokens_per_segment`` (the last
    piece may be shorter; empty examples give nothing)."""
    length = int(max_tokens_per_segment)

    def cut(x):
        t = x[feature_key]
        n = tf.size(t)
        k = (n + length - 1) // length
        rows = tf.reshape(tf.pad(t, [[0, k * length - n]]), [k, length])  # [k, length]
        return {feature_key: rows}

    def strip(x):
        t = x[feature_key]
        return {feature_key: tf.boolean_mask(t, tf.not_equal(t, 0))}

    dataset = dataset.map(cut, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
    return dataset.map(strip, num_parallel_calls=tf.data.AUTOTUNE)


def concat_and_split(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None = None,
                     feature_key: str = "targets", batch_size: int = 128) -> tf.data.Dataset:
    """LM examples: the token stream of consecutive examples cut into pieces of
    ``sequence_length[feature_key]`` (no padding inside a piece, no EOS added)."""
    dataset = reduce_concat_tokens(dataset, feature_key, batch_size)
    if not sequence_length or not sequence_length.get(feature_key):
        return dataset
    return split_tokens(dataset, sequence_length[feature_key], feature_key)


# ---------------------------------------------------------------------------------------------
# Span corruption (T5 pretraining)
# ---------------------------------------------------------------------------------------------


def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest raw piece whose span-corrupted inputs (plus
    EOS) fit in ``inputs_length``, and the targets length it then needs (plus EOS).

    T5's 512-token inputs take 568 raw tokens and need 114 target tokens.
    """

    def lengths(tokens_length: int) -> tuple[int, int]:
        num_noise = int(round(tokens_length * noise_density))
        num_nonnoise = tokens_length - num_noise
        num_spans = int(round(num_noise / mean_noise_span_length))
        return (num_nonnoise + num_spans * extra_tokens_per_span_inputs + 1,
                num_noise + num_spans * extra_tokens_per_span_targets + 1)

    tokens_length = inputs_length - 1
    while lengths(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    return tokens_length, lengths(tokens_length)[1]


def _random_segment_lengths(num_items: tf.Tensor, num_segments: tf.Tensor,
                            seed: tf.Tensor) -> tf.Tensor:
    """A uniformly random split of ``num_items`` into ``num_segments`` non-empty parts."""
    first_in_segment = tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32)
    first_in_segment = tf.pad(seqio.utils.stateless_shuffle(first_in_segment, seed), [[1, 0]])
    segment_id = tf.cumsum(first_in_segment)
    return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)  # [num_segments]


def random_spans_noise_mask(length: tf.Tensor, noise_density: float, seeds: tf.Tensor,
                            mean_noise_span_length: float = 3.0) -> tf.Tensor:
    """<bool>[length]: ``round(length * noise_density)`` noise tokens in
    ``round(num_noise / mean_noise_span_length)`` spans (at least one of each), the spans and the
    gaps between them of random lengths; the first token is never noise.

    ``seeds``: <int32>[2, 2] stateless seeds (noise lengths, gap lengths).
    """
    orig_length = length
    length = tf.maximum(length, 2)
    num_noise = tf.cast(tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
    num_noise = tf.clip_by_value(num_noise, 1, length - 1)
    num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
                        tf.int32)
    num_spans = tf.maximum(num_spans, 1)
    noise_lengths = _random_segment_lengths(num_noise, num_spans, seeds[0])
    gap_lengths = _random_segment_lengths(length - num_noise, num_spans, seeds[1])
    # gap, span, gap, span, ...: span k starts where the (2k+1)-th run starts.
    runs = tf.reshape(tf.stack([gap_lengths, noise_lengths], axis=1), [-1])  # [2 * num_spans]
    run_starts = tf.cumsum(runs)[:-1]
    start_indicator = tf.math.unsorted_segment_sum(tf.ones_like(run_starts), run_starts, length)
    run_index = tf.cumsum(start_indicator)
    return tf.equal(run_index % 2, 1)[:orig_length]


def noise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                  vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """Each noise span -> one sentinel (``vocab_size - 1``, ``vocab_size - 2``, ...)."""
    prev_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
    first_noise = tf.logical_and(noise_mask, tf.logical_not(prev_is_noise))
    later_noise = tf.logical_and(noise_mask, prev_is_noise)
    sentinel = vocabulary.vocab_size - tf.cumsum(tf.cast(first_noise, tokens.dtype))
    tokens = tf.where(first_noise, sentinel, tokens)
    return tf.boolean_mask(tokens, tf.logical_not(later_noise))


def nonnoise_span_to_unique_sentinel(tokens: tf.Tensor, noise_mask: tf.Tensor,
                                     vocabulary: seqio.Vocabulary) -> tf.Tensor:
    """The complement: each kept span -> one sentinel, the dropped tokens stay."""
    return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask), vocabulary)


@seqio.map_over_dataset(num_seeds=1)
def select_random_chunk(x, seed, max_length: int = 65536, feature_key: str = "targets"):
    """A random aligned chunk of at most ``max_length`` tokens (keeps long documents cheap)."""
    tokens = x[feature_key]
    n = tf.size(tokens)
    num_chunks = tf.maximum((n + max_length - 1) // max_length, 1)
    start = max_length * tf.random.stateless_uniform([], seed, 0, num_chunks, dtype=tf.int32)
    return {feature_key: tokens[start:tf.minimum(start + max_length, n)]}


@seqio.map_over_dataset(num_seeds=2)
def _denoise(x, seeds, vocabulary, noise_density, mean_noise_span_length):
    tokens = x["targets"]
    mask = random_spans_noise_mask(tf.size(tokens), noise_density, seeds, mean_noise_span_length)
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, mask, vocabulary),
        "targets": nonnoise_span_to_unique_sentinel(tokens, mask, vocabulary),
    }


def span_corruption(dataset: tf.data.Dataset, sequence_length: Mapping[str, int] | None,
                    output_features: Mapping[str, seqio.Feature],
                    noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0) -> tf.data.Dataset:
    """T5's span corruption of tokenized ``targets`` (documents): a random chunk of each document,
    documents concatenated and cut into raw pieces sized so that the corrupted inputs fit
    ``sequence_length["inputs"]`` (EOS included, appended later by ``append_eos_after_trim``),
    then noise spans -> sentinels in the inputs and kept spans -> sentinels in the targets."""
    inputs_length = (sequence_length or {}).get("inputs") or 512
    tokens_length, targets_length = random_spans_helper(
        inputs_length, noise_density, mean_noise_span_length)
    if sequence_length and sequence_length.get("targets") and \
            sequence_length["targets"] < targets_length:
        raise ValueError(
            f"Span corruption with inputs length {inputs_length} makes targets of up to "
            f"{targets_length} tokens, but the targets length is {sequence_length['targets']}: "
            f"set TASK_FEATURE_LENGTHS to {{'inputs': {inputs_length}, "
            f"'targets': {targets_length}}} (or longer targets).")
    dataset = select_random_chunk(dataset)
    dataset = reduce_concat_tokens(dataset, "targets", batch_size=128)
    dataset = split_tokens(dataset, tokens_length, "targets")
    return _denoise(dataset, vocabulary=output_features["targets"].vocabulary,
                    noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)


def tokenize_no_copy(dataset: tf.data.Dataset,
                     output_features: Mapping[str, seqio.Feature]) -> tf.data.Dataset:
    """``seqio.preprocessors.tokenize`` without the ``*_pretokenized`` copies (LM streams)."""
    return seqio.preprocessors.tokenize(dataset, output_features, copy_pretokenized=False)

