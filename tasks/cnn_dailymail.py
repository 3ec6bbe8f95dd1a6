"""CNN / DailyMail summarization (TFDS ``cnn_dailymail:3.4.0``): ``"summarize: <article>"`` ->
the highlights (one per line); ROUGE-1/2/L/Lsum from ``tasks.metrics``. Task:
``cnn_dailymail``."""

from __future__ import annotations

import seqio

from tasks import common
from tasks import metrics as m
from tasks import preprocessors as pp

common.add_task(
    "cnn_dailymail",
    source=seqio.TfdsDataSource(tfds_name="cnn_dailymail:3.4.0",
                                splits=("train", "validation", "test")),
    preprocessors=[
        pp.summarize,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=common.text_to_text_features(common.T5_VOCAB),
    metric_fns=[m.rouge],
)
