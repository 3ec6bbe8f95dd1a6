"""seqio tasks: every registered task builds (TFDS mock data or tiny local files) and converts to
model features; preprocessors and metrics against hand-computed cases."""

import importlib
import os
import types

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from helpers import PROSE as _PROSE
from helpers import write_offline_cache as _write_offline_cache

from hypermoe_jax.data import cache as cache_lib
from hypermoe_jax.data import text as text_lib
from hypermoe_jax.data import vocab as vocab_lib

# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny T5 stand-in vocabulary and a tiny offline cache, set up before any task's
# vocabulary is first used (they are resolved lazily, once per process).
# ---------------------------------------------------------------------------------------------



@pytest.fixture(scope="module", autouse=True)
def local_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_PROSE * 2 + [
        "question: context: summarize: sentiment: positive negative entailment neutral",
        "contradiction not_entailment acceptable unacceptable equivalent duplicate True False",
        "wsc: record query: entities: passage: choice1 choice2 sentence1 sentence2 premise",
    ]))
    spm = vocab_lib.train_sentencepiece([corpus], 400, root / "vocab", name="t5-stand-in")
    cache = root / "cache"
    _write_offline_cache(cache)
    rng = np.random.default_rng(0)
    (root / "enwik8").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (root / "text8").write_bytes(bytes(rng.choice(list(b"abcdefgh "), 3000)))
    (root / "wikitext103").mkdir()
    for f in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"):
        (root / "wikitext103" / f).write_text(" = Title = \n\n" + "\n".join(_PROSE) + "\n")
    env = {vocab_lib.T5_SPM_ENV: str(spm), cache_lib.CACHE_ENV: str(cache),
           "HYPERMOE_ENWIK8": str(root / "enwik8"), "HYPERMOE_TEXT8": str(root / "text8"),
           "HYPERMOE_WIKITEXT103": str(root / "wikitext103")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield types.SimpleNamespace(root=root, cache=cache, spm=spm)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def registered(local_data):
    import tasks

    return tasks


# ---------------------------------------------------------------------------------------------
# Every task builds and converts
# ---------------------------------------------------------------------------------------------


def _all_task_names():
    import tasks

    return tasks.task_names()


def _lengths(task):
    if "inputs" not in task.output_features:
        return {"targets": 32}
    if "span_corruption" in task.name:
        return {"inputs": 32, "targets": 12}
    return {"inputs": 64, "targets": 16}


def _tfds_name(task):
    src = task.source
    return src.tfds_dataset.name if isinstance(src, seqio.TfdsDataSource) else None


@pytest.mark.parametrize("name", _all_task_names())
def test_task_builds_and_converts(name, registered, local_data, monkeypatch):
    task = seqio.get_mixture_or_task(name)
    lengths = _lengths(task)
    split = task.source.splits[0] if "train" not in task.source.splits else "train"
    with tfds.testing.mock_data(num_examples=4):
        if _tfds_name(task) == "c4/en:3.0.1":
            # Current TFDS code cannot build 3.0.1 (only read one prepared before), so mock data
            # comes from the 3.1.0 builder with the same features.
            newer = seqio.TfdsDataSource(tfds_name="c4/en:3.1.0", splits=("train", "validation"))
            monkeypatch.setattr(task, "_source", newer)
        # (Mock data has no split sizes, which the in-memory cache check reads.)
        ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1,
                              try_in_mem_cache=False)
        examples = list(ds.take(3).as_numpy_iterator())
        converter_cls = (seqio.EncDecFeatureConverter if "inputs" in task.output_features
                         else seqio.LMFeatureConverter)
        converted = list(converter_cls(pack=False)(ds, lengths).take(2).as_numpy_iterator())
    assert examples, name
    for ex in examples:
        for key in task.output_features:
            assert ex[key].dtype == np.int32 and ex[key].ndim == 1, (name, key)
            assert 0 < len(ex[key]) <= lengths[key], (name, key, len(ex[key]))
            assert np.all(ex[key] > 0) and np.all(
                ex[key] < task.output_features[key].vocabulary.vocab_size), (name, key)
    if converter_cls is seqio.EncDecFeatureConverter:
        want = {"encoder_input_tokens": lengths["inputs"], "decoder_target_tokens":
                lengths["targets"], "decoder_input_tokens": lengths["targets"],
                "decoder_loss_weights": lengths["targets"]}
    else:
        want = {k: lengths["targets"] for k in
                ("decoder_target_tokens", "decoder_input_tokens", "decoder_loss_weights")}
    for ex in converted:
        assert {k: v.shape[0] for k, v in ex.items()} == want, name
        assert all(v.dtype == np.int32 for v in ex.values()), name


def test_mixtures_build(registered):
    for name in registered.mixture_names():
        mixture = seqio.get_mixture_or_task(name)
        assert mixture.tasks, name
    with tfds.testing.mock_data(num_examples=4):
        ds = seqio.get_mixture_or_task("glue_mixture").get_dataset(
            {"inputs": 64, "targets": 8}, split="train", shuffle=False, num_epochs=1,
            try_in_mem_cache=False)
        assert len(list(ds.take(4).as_numpy_iterator())) == 4


def test_reimport_is_idempotent(registered):
    before = registered.task_names()
    for mod in ("tasks.glue", "tasks.offline", "tasks.c4", "tasks.lm"):
        importlib.reload(importlib.import_module(mod))
    importlib.reload(registered)
    assert registered.task_names() == before
    assert set(before) <= set(seqio.TaskRegistry.names())
    assert len(before) >= 35


def test_glue_label_names_match_tfds(registered):
    from tasks import glue

    for bench, items, version in (("glue", glue.GLUE, glue.GLUE_VERSION),
                                  ("super_glue", glue.SUPER_GLUE, glue.SUPER_GLUE_VERSION)):
        for b in items:
            if not b.label_names:
                continue
            builder = tfds.builder(f"{bench}/{b.tfds_config}:{version}")
            assert tuple(builder.info.features["label"].names) == b.label_names, b.name


# ---------------------------------------------------------------------------------------------
# Offline and local-file tasks: content and errors
# ---------------------------------------------------------------------------------------------


def test_wiki_char_lm_is_the_byte_stream(registered, local_data):
    task = seqio.get_mixture_or_task("wiki_char_lm")
    ds = task.get_dataset({"targets": 50}, split="train", shuffle=False)
    tokens = np.concatenate([ex["targets"] for ex in ds.as_numpy_iterator()])
    raw = (local_data.cache / "wiki/char/train.raw").read_bytes()
    assert bytes((tokens - 3).astype(np.uint8)) == raw  # ByteVocabulary: byte b -> b + 3
    lengths = [len(ex["targets"]) for ex in ds.as_numpy_iterator()]
    assert all(n == 50 for n in lengths[:-1])


def test_word_lm_marks_document_ends_with_eos(registered):
    task = seqio.get_mixture_or_task("sotu_lm")
    ds = task.get_dataset({"targets": 1000}, split="validation", shuffle=False)
    tokens = np.concatenate([ex["targets"] for ex in ds.as_numpy_iterator()])
    vocab = task.output_features["targets"].vocabulary
    assert list(tokens).count(vocab.eos_id) == 2  # two documents in the tiny file
    assert "state of the union" in vocab.decode([t for t in tokens if t != vocab.eos_id])


def test_sentiment_task_text(registered):
    task = seqio.get_mixture_or_task("rotten_tomatoes_sentiment")
    ex = next(task.get_dataset({"inputs": 64, "targets": 8}, split="test",
                               shuffle=False).as_numpy_iterator())
    assert ex["inputs_pretokenized"] == b"sentiment: A charming, funny film."
    assert ex["targets_pretokenized"] == b"positive"
    post = task.postprocess_fn
    assert post("positive") == 1 and post("negative") == 0 and post("meh") == -1


def test_missing_offline_data_says_how_to_fetch(registered, tmp_path, monkeypatch):
    task = seqio.get_mixture_or_task("wiki_text8_lm")
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(tmp_path / "empty"))
    with pytest.raises(cache_lib.DataMissingError, match="python -m hypermoe_jax.data fetch wiki"):
        task.get_dataset({"targets": 16}, split="train")


def test_local_corpus_paths_and_byte_splits(registered, tmp_path, monkeypatch):
    task = seqio.get_mixture_or_task("enwik8_lm")
    monkeypatch.delenv("HYPERMOE_ENWIK8", raising=False)
    with pytest.raises(FileNotFoundError, match="HYPERMOE_ENWIK8"):
        task.get_dataset({"targets": 16}, split="train")
    body = bytes(range(256)) * 8 + b"tail"  # 2052 bytes: test split is the last 5%
    path = tmp_path / "enwik8"
    path.write_bytes(body)
    monkeypatch.setenv("HYPERMOE_ENWIK8", str(path))
    ds = task.get_dataset({"targets": 40}, split="test", shuffle=False)
    tokens = np.concatenate([ex["targets"] for ex in ds.as_numpy_iterator()])
    start, end = text_lib.split_ranges(len(body))["test"]
    assert bytes((tokens - 3).astype(np.uint8)) == body[start:end]


def test_byte_chunk_source_shards_cover_everything(tmp_path):
    from tasks.sources import ByteChunkSource

    body = os.urandom(1000)
    path = tmp_path / "f.raw"
    path.write_bytes(body)
    src = ByteChunkSource(lambda split: (str(path), 100, 950), chunk_bytes=64)
    whole = b"".join(x["text"] for x in src.get_dataset("train", shuffle=False).as_numpy_iterator())
    assert whole == body[100:950]
    shards = [list(src.get_dataset("train", shuffle=False, shard_info=seqio.ShardInfo(i, 3))
                   .as_numpy_iterator()) for i in range(3)]
    chunks = sorted(x["text"] for s in shards for x in s)
    assert chunks == sorted(body[100 + i:min(100 + i + 64, 950)] for i in range(0, 850, 64))


def test_text_line_source_block_sharding(tmp_path):
    from tasks.sources import TextLineSource

    path = tmp_path / "lines.txt"
    path.write_text("".join(f"{i}\n" for i in range(10)))
    src = TextLineSource(lambda split: [str(path)], block_lines=3)
    got = [[int(x["text"]) for x in src.get_dataset(
        "train", shuffle=False, shard_info=seqio.ShardInfo(i, 2)).as_numpy_iterator()]
        for i in range(2)]
    assert got == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]


def test_t5_vocabulary_missing_file_is_explained(monkeypatch, tmp_path):
    lazy = vocab_lib.LazySentencePieceVocabulary(lambda: str(tmp_path / "nope.model"), name="t5")
    with pytest.raises(FileNotFoundError, match=vocab_lib.T5_SPM_ENV):
        lazy.vocab_size  # noqa: B018


# ---------------------------------------------------------------------------------------------
# Preprocessors, hand-checked
# ---------------------------------------------------------------------------------------------


def _one(preprocessor, example, **kwargs):
    ds = tf.data.Dataset.from_tensors(example)
    return next(preprocessor(ds, **kwargs).as_numpy_iterator())


def test_glue_formats():
    from tasks import preprocessors as pp

    ex = _one(pp.glue, {"sentence": "it 's a charming journey .", "label": 1, "idx": 7},
              benchmark_name="sst2", label_names=("negative", "positive"))
    assert ex["inputs"] == b"sst2 sentence: it 's a charming journey ."
    assert ex["targets"] == b"positive" and ex["idx"] == 7
    ex = _one(pp.glue, {"premise": "P.", "hypothesis": "H.", "label": -1, "idx": 0},
              benchmark_name="mnli", label_names=("entailment", "neutral", "contradiction"))
    assert ex["inputs"] == b"mnli hypothesis: H. premise: P."
    assert ex["targets"] == b"<unk>"
    ex = _one(pp.glue, {"question": "Q?", "answer": "A", "paragraph": "P", "label": 0,
                        "idx": {"paragraph": 1, "question": 2, "answer": 3}},
              benchmark_name="multirc", label_names=("False", "True"),
              feature_names=("question", "answer", "paragraph"))
    assert ex["inputs"] == b"multirc question: Q? answer: A paragraph: P"
    assert ex["targets"] == b"False" and ex["idx"]["question"] == 2


@pytest.mark.parametrize("score,text", [(3.14, b"3.2"), (0.0, b"0.0"), (4.9, b"4.8"),
                                        (4.95, b"5.0"), (2.5, b"2.4")])
def test_stsb_rounds_to_fifths(score, text):
    from tasks import preprocessors as pp

    ex = _one(pp.stsb, {"sentence1": "a", "sentence2": "b", "label": score, "idx": 0})
    assert ex["targets"] == text  # round(score * 5) / 5 (2.5 * 5 = 12.5 rounds to even: 12)
    assert ex["inputs"] == b"stsb sentence1: a sentence2: b"


def test_wsc_marks_the_pronoun():
    from tasks import preprocessors as pp

    ex = _one(pp.wsc_simple, {
        "text": "The city councilmen refused the demonstrators a permit because they feared "
                "violence.", "span1_index": 0, "span1_text": "The city councilmen",
        "span2_index": 9, "span2_text": "they", "label": 1, "idx": 3})
    assert ex["inputs"] == (b"wsc: The city councilmen refused the demonstrators a permit "
                            b"because *they* feared violence.")
    assert ex["targets"] == b"The city councilmen"
    ex = _one(pp.wsc_simple, {"text": "Bob saw him.", "span1_index": 0, "span1_text": "Bob",
                              "span2_index": 2, "span2_text": "him", "label": 0, "idx": 0})
    assert ex["inputs"] == b"wsc: Bob saw *him*."


def test_record_and_squad_formats():
    from tasks import preprocessors as pp

    ex = _one(pp.record, {
        "passage": "Rain falls.\n@highlight\nSun shines\n@highlight\nWind",
        "query": "@placeholder wins",
        "entities": ["Sun", "Rain"], "answers": ["Sun", "the Sun"],
        "idx": {"passage": 0, "query": 1}})
    assert ex["inputs"] == (b"record query: @placeholder wins entities: Sun, Rain passage: "
                            b"Rain falls. Sun shines. Wind")
    assert ex["targets"] == b"Sun" and list(ex["answers"]) == [b"Sun", b"the Sun"]
    ex = _one(pp.squad, {"question": "Who?", "context": "Me.", "id": "x", "title": "t",
                         "answers": {"text": ["Me", "me"], "answer_start": [0, 0]}})
    assert ex["inputs"] == b"question: Who? context: Me." and ex["targets"] == b"Me"
    ex = _one(pp.summarize, {"article": "Long text.", "highlights": "Short."})
    assert ex["inputs"] == b"summarize: Long text." and ex["targets"] == b"Short."
    ex = _one(pp.labelled_tsv, {"text": "negative\tNot\tgood."}, prefix="sentiment")
    assert ex["inputs"] == b"sentiment: Not\tgood." and ex["targets"] == b"negative"


def test_concat_and_split():
    from tasks import preprocessors as pp

    ds = tf.data.Dataset.from_generator(
        lambda: iter([{"targets": [5, 6, 7]}, {"targets": [8]}, {"targets": [9, 10, 11, 12]}]),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    got = [list(x["targets"]) for x in pp.concat_and_split(
        ds, {"targets": 3}, batch_size=2).as_numpy_iterator()]
    # batches of 2 documents are concatenated: [5 6 7 8] and [9 10 11 12], then cut into 3s
    assert got == [[5, 6, 7], [8], [9, 10, 11], [12]]


def test_random_spans_helper_matches_t5_lengths():
    from tasks import preprocessors as pp

    # 568 raw tokens: 85 noise tokens in 28 spans -> inputs 483 + 28 + EOS = 512,
    # targets 85 + 28 + EOS = 114.
    assert pp.random_spans_helper(512) == (568, 114)
    assert pp.random_spans_helper(32) == (34, 8)


def test_sentinels_hand_checked():
    from tasks import preprocessors as pp

    vocab = types.SimpleNamespace(vocab_size=100)
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16, 17])
    mask = tf.constant([0, 1, 1, 0, 0, 1, 0, 0]) > 0
    assert list(pp.noise_span_to_unique_sentinel(tokens, mask, vocab).numpy()) == \
        [10, 99, 13, 14, 98, 16, 17]
    assert list(pp.nonnoise_span_to_unique_sentinel(tokens, mask, vocab).numpy()) == \
        [99, 11, 12, 98, 15, 97]


@pytest.mark.parametrize("length", [10, 100, 568])
def test_noise_mask_density_and_spans(length):
    from tasks import preprocessors as pp

    for s in range(5):
        seeds = tf.constant([[s, 1], [s, 2]])
        mask = pp.random_spans_noise_mask(tf.constant(length), 0.15, seeds, 3.0).numpy()
        num_noise = min(max(round(length * 0.15), 1), length - 1)
        starts = np.sum(mask[1:] & ~mask[:-1]) + mask[0]
        assert mask.shape == (length,) and mask.sum() == num_noise
        assert starts == max(round(num_noise / 3.0), 1)
        assert not mask[0]


def test_span_corruption_reconstructs_the_text():
    from tasks import preprocessors as pp

    vocab = types.SimpleNamespace(vocab_size=1000, eos_id=1)
    features = {"targets": types.SimpleNamespace(vocabulary=vocab)}
    docs = [list(range(3, 3 + n)) for n in (40, 7, 90)]
    ds = tf.data.Dataset.from_generator(
        lambda: iter({"targets": d} for d in docs),
        output_signature={"targets": tf.TensorSpec([None], tf.int32)})
    with seqio.utils.map_seed_manager(42):
        out = list(pp.span_corruption(ds, {"inputs": 32, "targets": 8}, features)
                   .as_numpy_iterator())
    stream = []
    for ex in out:
        inputs, targets = list(ex["inputs"]), list(ex["targets"])
        assert len(inputs) + 1 <= 32 and len(targets) + 1 <= 8
        spans, current = {}, None  # sentinel -> the tokens it replaced
        for t in targets:
            if t >= 900:
                current = t
                spans[current] = []
            else:
                spans[current].append(t)
        assert sorted(spans, reverse=True) == [999 - i for i in range(len(spans))]
        piece = []
        for t in inputs:
            piece.extend(spans[t] if t >= 900 else [t])
        stream.extend(piece)
        noise = sum(len(v) for v in spans.values())
        assert noise == round(len(piece) * 0.15) or len(piece) < 34
    assert stream == [t for d in docs for t in d]


# ---------------------------------------------------------------------------------------------
# Metrics, against hand-computed values
# ---------------------------------------------------------------------------------------------


def test_classification_metrics():
    from tasks import metrics as m

    t, p = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]
    assert m.accuracy(t, p) == {"accuracy": 60.0}
    # tp=2 fp=1 fn=1 -> F1 = 4/6
    assert m.f1_binary(t, p)["f1"] == pytest.approx(100 * 4 / 6)
    # invalid prediction (-1) counts as wrong: tp=1 fp=1 fn=2 -> 2/5
    assert m.f1_binary(t, [1, -1, 0, 1, 0])["f1"] == pytest.approx(100 * 2 / 5)
    # MCC = (tp*tn - fp*fn) / sqrt(...) = (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert m.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(100 / 6)
    assert m.matthews_corrcoef([0, 1, 2], [0, 1, 2])["matthews_corrcoef"] == pytest.approx(100)
    # class 0: tp=1 fp=0 fn=1 -> 2/3; class 1: tp=1 fp=1 fn=0 -> 2/3; class 2: tp=1 -> 1
    f1 = m.mean_multiclass_f1(3)([0, 0, 1, 2], [0, 1, 1, 2])["mean_3class_f1"]
    assert f1 == pytest.approx(100 * (2 / 3 + 2 / 3 + 1) / 3)


def test_correlations():
    from tasks import metrics as m

    t, p = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.0]
    # pearson: dx = [-1.5 -.5 .5 1.5], dy = [-1.75 .25 1.25 .25]: sum dxdy = 3.5,
    # sum dx^2 = 5, sum dy^2 = 4.75 -> 3.5 / sqrt(23.75)
    assert m.pearson_corrcoef(t, p)["pearson_corrcoef"] == pytest.approx(100 * 3.5 / 23.75**0.5)
    # spearman: ranks of p = [1, 2.5, 4, 2.5]: dy = [-1.5 0 1.5 0], sum dxdy = 2.25 + 0.75
    # -> 3 / sqrt(5 * 4.5)
    assert m.spearman_corrcoef(t, p)["spearman_corrcoef"] == pytest.approx(
        100 * 3.0 / (5 * 4.5) ** 0.5)


def test_squad_and_record_metrics():
    from tasks import metrics as m

    got = m.squad([["The Eiffel Tower", "Eiffel"], ["blue sky"]], ["eiffel tower", "sky"])
    # ex 1: exact after normalisation (articles dropped); ex 2: P=1, R=1/2 -> F1 2/3
    assert got["em"] == pytest.approx(50.0)
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    post = m.qa_answers
    assert post(b"x", example={"answers": np.array([b"a", b"b"])}, is_target=True) == ["a", "b"]
    assert post(b"x", example={"answers": np.array([b"a"])}, is_target=False) == "x"


def test_multirc_and_axg_metrics():
    from tasks import metrics as m

    def ex(p, q):
        return {"idx": {"paragraph": np.int32(p), "question": np.int32(q), "answer": np.int32(0)}}

    targets = [m.multirc(v, ex(0, q), True) for v, q in
               (("True", 0), ("False", 0), ("True", 1), ("True", 1))]
    preds = [m.multirc(v, ex(0, q)) for v, q in
             (("True", 0), ("False", 0), ("True", 1), ("False", 1))]
    got = m.multirc_metrics(targets, preds)
    # question 0 all right, question 1 not -> EM 50; tp=2 fp=0 fn=1 -> F1 4/5
    assert got == {"exact_match": 50.0, "f1a": pytest.approx(80.0)}
    t = [m.axg(v, {"idx": i}, True) for i, v in enumerate(
        ["entailment", "entailment", "not_entailment", "not_entailment"])]
    p = [m.axg(v, {"idx": i}) for i, v in enumerate(
        ["entailment", "not_entailment", "not_entailment", "not_entailment"])]
    assert m.axg_metrics(t, p) == {"accuracy": 75.0, "gender_parity": 50.0}


def test_wsc_postprocess():
    from tasks import metrics as m

    example = {"label": np.int64(1), "span1_text": b"The city councilmen"}
    assert m.wsc("the city councilmen", example, is_target=False) == 1
    assert m.wsc("councilmen", example, is_target=False) == 1
    assert m.wsc("the demonstrators", example, is_target=False) == 0
    assert m.wsc("whatever", example, is_target=True) == 1


def test_rouge_hand_computed():
    from tasks import metrics as m

    ref, pred = "the cat sat on the mat", "the cat lay on the mat"
    # unigrams: 5 of 6 match -> P = R = F = 5/6; bigrams: the-cat, on-the, the-mat = 3 of 5
    # LCS = the cat on the mat (5) -> 5/6
    got = m.rouge([ref], [pred])
    assert got["rouge1"] == pytest.approx(100 * 5 / 6)
    assert got["rouge2"] == pytest.approx(100 * 3 / 5)
    assert got["rougeL"] == pytest.approx(100 * 5 / 6)
    assert got["rougeLsum"] == pytest.approx(100 * 5 / 6)
    # Lsum over sentences: ref lines "a b c" / "d e"; pred lines "a c" / "e d x".
    # LCS(ref1, pred*) = {a, c}; LCS(ref2, pred*) = {d} or {e}: 3 hits; P = 3/5, R = 3/5
    assert m.rouge_lsum("a c\ne d x", "a b c\nd e") == pytest.approx(3 / 5)
    assert m.rouge(["a"], ["b"])["rouge1"] == 0.0


def test_trainer_pipelines_autotune_unless_told_not_to(registered):
    """``training.datasets``: every pipeline carries ``pipeline_options`` (tf.data autotuning on
    by default, off by gin) and keeps ``PREFETCH_BATCHES`` batches ready; the batches are the
    same either way."""
    import gin

    from hypermoe_jax.models import DecoderOnlyModel
    from hypermoe_jax.training import datasets

    cfg = datasets.DatasetConfig("wiki_char_lm", {"targets": 16}, batch_size=2, shuffle=False)

    def batches(ds):
        return [b["decoder_target_tokens"] for b in ds.take(3).as_numpy_iterator()]

    on = datasets.get_dataset(cfg, DecoderOnlyModel.FEATURE_CONVERTER_CLS)
    assert on.options().autotune.enabled is True
    assert "Prefetch" in type(on).__name__
    gin.clear_config()
    try:
        gin.bind_parameter("hypermoe_jax.training.datasets.pipeline_options.autotune", False)
        off = datasets.get_dataset(cfg, DecoderOnlyModel.FEATURE_CONVERTER_CLS)
    finally:
        gin.clear_config()
    assert off.options().autotune.enabled is False
    np.testing.assert_array_equal(batches(on), batches(off))
