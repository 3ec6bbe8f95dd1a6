"""HyperMoE, HyperRouter, SMoE-Dropout and MoE-Share as variants of the MoE layer.

CONTRACT (other modules depend on these names and signatures; implementation in progress):

* ``VARIANTS``: name -> (router_kind, hyper_kind) for ``switch``, ``hypermoe``, ``hyperrouter``,
  ``smoe_dropout``, ``moe_share``; ``hyper_kind`` in {"none", "hypermoe", "share"}.

* ``HyperExpertGenerator`` (one per stack, lives OUTSIDE the layer scan; its parameters are shared by
  all MoE layers of the stack):
      gen = HyperExpertGenerator(num_layers=L, num_experts=N, num_selected=k, d_model=d, ...)
      hyper_inputs = gen()   # pytree, every leaf with leading axis L (one slice per MoE layer)
  The transformer passes ``jax.tree.map(lambda a: a[m], hyper_inputs)`` (or scans over it) to the
  m-th MoE layer.

* ``SparseMlp`` (one per MoE layer; the variant switch):
      y, aux = SparseMlp(variant=..., num_experts=..., ...)(
          x, deterministic=..., padding_mask=None, active_k=None, hyper_inputs=None)
  ``x`` <[B, L, d]>; ``aux`` is a ``moe_layer.MoeAux``; ``hyper_inputs`` is the layer-m slice of the
  generator output (required for ``hypermoe``, ignored otherwise).
"""

from __future__ import annotations

VARIANTS: dict[str, tuple[str, str]] = {
    "switch": ("linear", "none"),
    "hypermoe": ("linear", "hypermoe"),
    "hyperrouter": ("hyper", "none"),
    "smoe_dropout": ("frozen_random", "none"),
    "moe_share": ("linear", "share"),
}
