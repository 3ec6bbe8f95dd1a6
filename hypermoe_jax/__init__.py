"""hypermoe-jax: hypernetwork-augmented Mixture-of-Experts (HyperMoE, HyperRouter) in JAX / Flax.

The package is layered; each layer imports only the ones above it:

* ``partitioning``  -- the (data, expert, model) mesh and the one logical-axis rules table;
* ``layers/``       -- routing, routers, experts, dispatch (expert-parallel), the MoE layer,
  HyperExperts, the grouped matmul, the variant switch (``MoeConfig``, ``SparseMlp``);
* ``architectures/``-- attention, blocks, scanned stacks, the T5 encoder-decoder and the
  decoder-only LM, size presets;
* ``losses``, ``models``, ``decoding`` -- the T5X-protocol models (loss, eval, scoring, cached
  greedy / sampling / beam decoding);
* ``training/``     -- gin-configured runs: train, evaluate, infer, checkpoints, optimizers, gin
  handling, reporting;
* ``data/``         -- real text fetched from package registries, vocabularies (used by ``tasks``).

``python -m hypermoe_jax.train`` and ``python -m hypermoe_jax.quickstart`` are the entry points.
"""
