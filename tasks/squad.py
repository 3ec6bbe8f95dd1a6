"""SQuAD v1.1 (TFDS ``squad/v1.1:3.0.0``) as T5 casts it: ``"question: <q> context: <c>"`` ->
the first answer; exact match and token F1 against all answers. Task: ``squad``."""

from __future__ import annotations

import seqio

from tasks import common
from tasks import metrics as m
from tasks import preprocessors as pp

common.add_task(
    "squad",
    source=seqio.TfdsDataSource(tfds_name="squad/v1.1:3.0.0", splits=("train", "validation")),
    preprocessors=[
        pp.squad,
        seqio.preprocessors.tokenize,
        seqio.CacheDatasetPlaceholder(),
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=common.text_to_text_features(common.T5_VOCAB),
    postprocess_fn=m.qa_answers,
    metric_fns=[m.squad],
)
