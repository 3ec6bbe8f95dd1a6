"""Runs: pretraining, fine-tuning, evaluation and inference, configured with gin.

A run is ``python -m hypermoe_jax.train --gin_file=... --gin.NAME=VALUE``: ``cli.main`` parses
the gin files (``gin_utils``), and the run gin (gin/runs/*.gin) binds ``cli.run.fn`` to
``train.train``, ``evaluate.evaluate`` or ``evaluate.infer``, which ``cli.run`` calls.

* ``cli``: ``main`` (arguments, multi-host start-up, errors as one line) and ``run``.
* ``train``: the train step and ``train`` (set-up, resume, final evals); ``loop``: the step loop
  (logging, periodic evals and checkpoints, preemption, non-finite losses); ``progress``: periodic
  progress lines with rate and ETA; ``outputs``: output directories a failed run removes.
* ``evaluate``: loss metrics, decoded predictions with seqio metrics; ``evaluate`` / ``infer``.
* ``datasets``: ``DatasetConfig`` and the seqio pipeline; ``state``: ``TrainState``, the mesh,
  sharded initialisation; ``checkpoints``: orbax save / restore; ``optimizers``: T5's optimizers
  and schedules; ``reporting``: metrics files and printed lines; ``errors``: what a user is told.
* ``quickstart``: fetch data, train a tiny model, evaluate it.
"""
