"""MoE layers: the building blocks every architecture composes.

Bottom to top (each module imports only those above it in this list):

* ``backend``       -- implementation choices by backend (one table, one override per choice);
* ``routing``       -- top-k selection, capacity, token priority, aux losses, metrics (pure);
* ``routers``       -- ``RouterConfig`` and the router modules (linear, frozen random, HyperRouter);
* ``experts``       -- ``ExpertsConfig``, expert MLP weights ``[E, d, f]``, expert-indexed adapters;
* ``dispatch``      -- ``DispatchConfig``, typed dispatch plans (einsum / gather), expert-parallel
  execution inside ``jax.shard_map`` with ``all_to_all`` over the ``expert`` mesh axis;
* ``moe_layer``     -- ``MoeLayer``: router + dispatch + experts (Switch / GShard);
* ``grouped``       -- the grouped adapter matmul (token t gets adapter ``ids[t]``);
* ``hyper_experts`` -- HyperMoE: ``HyperExpertsConfig``, the shared hypernetwork, the per-stack
  generator, HyperExperts applied per unselected set or per token;
* ``variants``      -- ``MoeConfig`` (the composition), the paper variants, ``SparseMlp``.

Options live in frozen config dataclasses next to the code that uses them; a ``MoeConfig`` is handed
down whole, never re-listed field by field.
"""
