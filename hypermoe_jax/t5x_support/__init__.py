"""The project's models under the upstream T5X binaries (``t5x.train``, ``t5x.eval``,
``t5x.infer``), configured by the gin files in ``gin/t5x/``.

* ``models.T5XModel`` -- a ``t5x.models.BaseTransformerModel`` around one of this project's
  models: variables with ``<collection>_axes`` metadata, ``flax_mutables`` exactly as T5X's
  trainer, evaluator and inference functions pass them, clu metrics with T5X's base metrics
  (timing, steps per second), and the training step tracked in the model state so that a
  growing-k schedule (SMoE-Dropout, HyperRouter) grows under T5X's trainer too.
* ``models.logical_factor_rules`` -- T5X Adafactor factorization rules for the logical axis names
  used here.
* ``partitioning.ExpertPartitioner`` -- T5X's MoE partitioner with the (data, expert, model)
  mesh, axis rules and optimizer-state axes of this project, inside which the MoE layers run
  expert-parallel (``shard_map`` + ``all_to_all`` over ``expert``).

Importing this package imports T5X (not a dependency of the project: install it as the README
says).
"""
