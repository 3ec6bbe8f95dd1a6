"""C4 span corruption (T5 pretraining) with T5's vocabulary.

- ``c4_span_corruption``: TFDS ``c4/en:3.0.1``, the version T5 and T5X trained on. Current TFDS
  code cannot prepare that version; it is read from a data dir prepared with an older TFDS.
- ``c4_v310_span_corruption``: TFDS ``c4/en:3.1.0``, the version current TFDS prepares.

Feature lengths come from ``TASK_FEATURE_LENGTHS``; the targets length must be at least what
the inputs length implies (``{'inputs': 512, 'targets': 114}`` as T5; see
``preprocessors.random_spans_helper``).
"""

from __future__ import annotations

import seqio

from tasks import common
from tasks import preprocessors as pp

C4_VERSIONS = {"c4_span_corruption": "c4/en:3.0.1", "c4_v310_span_corruption": "c4/en:3.1.0"}

for _name, _tfds_name in C4_VERSIONS.items():
    common.add_task(
        _name,
        source=seqio.TfdsDataSource(tfds_name=_tfds_name, splits=("train", "validation")),
        preprocessors=[
            pp.text_to_targets,
            seqio.preprocessors.tokenize,
            seqio.CacheDatasetPlaceholder(),
            pp.span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=common.text_to_text_features(common.T5_VOCAB),
        metric_fns=[],
    )
