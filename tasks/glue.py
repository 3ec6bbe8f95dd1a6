"""GLUE and SuperGLUE in T5's text-to-text form (TFDS ``glue`` 2.0.0, ``super_glue`` 1.0.2).

Tasks ``glue_<name>`` and ``super_glue_<name>``; mixtures ``glue_mixture`` and
``super_glue_mixture`` (rates: the number of training examples).

Formats (see ``tasks/preprocessors.py``): ``"sst2 sentence: it 's a charming journey ."`` ->
``"positive"``, ``"mnli hypothesis: ... premise: ..."`` -> ``"entailment"``, STS-B scores as
strings rounded to 0.2, the diagnostics AX as MNLI, AX-b / AX-g as RTE.

Special cases, simplified where T5 did more:

- ``super_glue_wsc`` (TFDS ``wsc.fixed``): input ``"wsc: <text with the *pronoun* marked>"``,
  target the candidate referent (``span1_text``). Scored by whether the predicted referent matches
  the candidate, compared with the label (accuracy). Our match is lenient word-set inclusion after
  dropping articles and punctuation, simpler than T5's. ``super_glue_wsc_train`` keeps only the
  examples whose candidate is correct (training on wrong referents would teach wrong answers); the
  mixture uses it.
- ``super_glue_record``: one example per query (T5 makes one per answer): the target is the first
  answer; EM / F1 take the max over all answers.
- ``super_glue_multirc``: one example per (question, answer) as in T5; exact match is per
  question (all its answers right) and F1 is over all answers.
- ``super_glue_axg``: accuracy, and gender parity over consecutive ``idx`` pairs (2k, 2k + 1),
  which we take to be the male / female versions of one sentence.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import seqio

from tasks import common
from tasks import metrics as m
from tasks import preprocessors as pp

GLUE_VERSION = "2.0.0"
SUPER_GLUE_VERSION = "1.0.2"
TRAIN_VAL_TEST = ("train", "validation", "test")

MNLI_LABELS = ("entailment", "neutral", "contradiction")
RTE_LABELS = ("entailment", "not_entailment")
BOOL_LABELS = ("False", "True")


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str  # task name suffix
    tfds_config: str
    label_names: tuple[str, ...]
    metric_fns: tuple[Callable, ...]
    splits: Sequence[str] | Mapping[str, str] = TRAIN_VAL_TEST
    prefix: str | None = None  # the benchmark word that starts the input; default ``name``
    feature_names: tuple[str, ...] | None = None
    train_examples: int = 0  # mixing rate


GLUE = [
    Benchmark("cola", "cola", ("unacceptable", "acceptable"), (m.matthews_corrcoef,),
              train_examples=8551),
    Benchmark("sst2", "sst2", ("negative", "positive"), (m.accuracy,), train_examples=67349),
    Benchmark("mrpc", "mrpc", ("not_equivalent", "equivalent"), (m.f1_binary, m.accuracy),
              train_examples=3668),
    Benchmark("qqp", "qqp", ("not_duplicate", "duplicate"), (m.f1_binary, m.accuracy),
              train_examples=363846),
    Benchmark("stsb", "stsb", (), (m.pearson_corrcoef, m.spearman_corrcoef), train_examples=5749),
    Benchmark("mnli", "mnli", MNLI_LABELS, (m.accuracy,),
              splits={"train": "train", "validation": "validation_matched",
                      "validation_matched": "validation_matched",
                      "validation_mismatched": "validation_mismatched",
                      "test": "test_matched", "test_matched": "test_matched",
                      "test_mismatched": "test_mismatched"},
              train_examples=392702),
    Benchmark("mnli_matched", "mnli_matched", MNLI_LABELS, (m.accuracy,),
              splits=("validation", "test"), prefix="mnli"),
    Benchmark("mnli_mismatched", "mnli_mismatched", MNLI_LABELS, (m.accuracy,),
              splits=("validation", "test"), prefix="mnli"),
    Benchmark("qnli", "qnli", RTE_LABELS, (m.accuracy,), train_examples=104743),
    Benchmark("rte", "rte", RTE_LABELS, (m.accuracy,), train_examples=2490),
    Benchmark("wnli", "wnli", ("not_entailment", "entailment"), (m.accuracy,),
              train_examples=635),
    Benchmark("ax", "ax", MNLI_LABELS, (m.matthews_corrcoef,), splits=("test",), prefix="mnli"),
]

SUPER_GLUE = [
    Benchmark("boolq", "boolq", BOOL_LABELS, (m.accuracy,), train_examples=9427),
    Benchmark("cb", "cb", ("entailment", "contradiction", "neutral"),
              (m.mean_multiclass_f1(3), m.accuracy), train_examples=250),
    Benchmark("copa", "copa", ("choice1", "choice2"), (m.accuracy,), train_examples=400),
    Benchmark("multirc", "multirc", BOOL_LABELS, (m.multirc_metrics,),
              feature_names=("question", "answer", "paragraph"), train_examples=27243),
    Benchmark("record", "record", (), (m.squad,), train_examples=100730),
    Benchmark("rte", "rte", RTE_LABELS, (m.accuracy,), train_examples=2490),
    Benchmark("wic", "wic", BOOL_LABELS, (m.accuracy,),
              feature_names=("sentence1", "sentence2", "word"), train_examples=5428),
    Benchmark("wsc", "wsc.fixed", BOOL_LABELS, (m.accuracy,), train_examples=554),
    Benchmark("axb", "axb", RTE_LABELS, (m.matthews_corrcoef,), splits=("test",), prefix="rte"),
    Benchmark("axg", "axg", RTE_LABELS, (m.axg_metrics,), splits=("test",), prefix="rte"),
]


def _text_preprocessor(b: Benchmark) -> Callable:
    if b.name == "stsb":
        return pp.stsb
    if b.name == "record":
        return pp.record
    if b.name == "wsc":
        return pp.wsc_simple
    return functools.partial(pp.glue, benchmark_name=b.prefix or b.name,
                             label_names=b.label_names, feature_names=b.feature_names)


def _postprocess_fn(b: Benchmark) -> Callable:
    if b.name == "stsb":
        return m.string_to_float
    if b.name == "record":
        return m.qa_answers
    if b.name == "wsc":
        return m.wsc
    if b.name == "multirc":
        return m.multirc
    if b.name == "axg":
        return m.axg
    return m.string_label_to_class_id(b.label_names)


def _register(benchmark: str, version: str, b: Benchmark, name: str, extra=()) -> None:
    common.add_task(
        name,
        source=seqio.TfdsDataSource(tfds_name=f"{benchmark}/{b.tfds_config}:{version}",
                                    splits=b.splits),
        preprocessors=[
            _text_preprocessor(b),
            *extra,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=common.text_to_text_features(common.T5_VOCAB),
        postprocess_fn=_postprocess_fn(b),
        metric_fns=list(b.metric_fns),
    )


for _b in GLUE:
    _register("glue", GLUE_VERSION, _b, f"glue_{_b.name}")
for _b in SUPER_GLUE:
    _register("super_glue", SUPER_GLUE_VERSION, _b, f"super_glue_{_b.name}")
_register("super_glue", SUPER_GLUE_VERSION, next(b for b in SUPER_GLUE if b.name == "wsc"),
          "super_glue_wsc_train", extra=(pp.filter_label,))

common.add_mixture("glue_mixture",
                   [(f"glue_{b.name}", b.train_examples) for b in GLUE if b.train_examples])
common.add_mixture("super_glue_mixture",
                   [(f"super_glue_{b.name}" if b.name != "wsc" else "super_glue_wsc_train",
                     b.train_examples) for b in SUPER_GLUE if b.train_examples])
