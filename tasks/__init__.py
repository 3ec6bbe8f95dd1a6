"""seqio tasks and mixtures, registered when this package is imported (``import tasks`` in a
gin file). Importing again, or reloading a module, replaces the registrations without error.

=========================  ==========================================================
module                     tasks
=========================  ==========================================================
``tasks.c4``               ``c4_span_corruption`` (c4/en:3.0.1), ``c4_v310_span_corruption``
``tasks.glue``             ``glue_*``, ``super_glue_*``, ``glue_mixture``, ``super_glue_mixture``
``tasks.squad``            ``squad`` (v1.1)
``tasks.cnn_dailymail``    ``cnn_dailymail``
``tasks.lm``               ``enwik8_lm``, ``text8_lm``, ``wikitext103_lm`` (local files)
``tasks.offline``          ``wiki_char_lm``, ``wiki_text8_lm``, ``sotu_lm``, ``shakespeare_lm``,
                           ``offline_prose_lm``, ``offline_span_corruption``,
                           ``rotten_tomatoes_sentiment``, ``uci_sentiment``
=========================  ==========================================================

TFDS tasks read ``$TFDS_DATA_DIR`` (prepared datasets); their vocabulary is T5's sentencepiece
model (``$HYPERMOE_T5_SPM``, see ``hypermoe_jax/data/vocab.py``). Local-file tasks take their paths
from environment variables (``tasks/lm.py``) or the offline cache (``hypermoe_jax/data/``).
Feature lengths are given when a dataset is requested (``TASK_FEATURE_LENGTHS``).
"""

from tasks import c4, cnn_dailymail, glue, lm, offline, squad  # noqa: F401  (registration)
from tasks.common import MIXTURE_NAMES, TASK_NAMES


def task_names() -> list[str]:
    """Names of the tasks this package registers, sorted."""
    return sorted(TASK_NAMES)


def mixture_names() -> list[str]:
    """Names of the mixtures this package registers, sorted."""
    return sorted(MIXTURE_NAMES)
