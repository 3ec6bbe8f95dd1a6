"""Names of the intermediates a remat policy can save or recompute.

Layers tag their large activations with ``jax.ad_checkpoint.checkpoint_name`` under one of the
names below; ``TransformerConfig.remat_policy`` names which of them a rematerialised period saves
for the backward pass (``architectures.config.parse_remat_policy``). The names are declared only
here, so a policy and the code it refers to cannot drift apart.

==========================  ======================================  ===========================
name                        what                                    shape
==========================  ======================================  ===========================
``attention_qkv``           query, key and value projections        [B, L, H, D] each
``attention_out``           attention output projection             [B, L, d]
``mlp_hidden``              dense MLP hidden activation             [B, L, f]
``mlp_out``                 dense MLP output                        [B, L, d]
``router_logits``           MoE router logits (float32)             [G, S, E]
``moe_dispatched``          tokens at their experts                 [E_l, G, C, d] | [rows, d]
``moe_expert_hidden``       expert MLP hidden activation            [E_l, G, C, f] | [rows, f]
``moe_expert_out``          expert outputs before the way back      [E_l, G, C, d] | [rows, d]
``moe_out``                 MoE layer output (combined)             [G, S, d]
==========================  ======================================  ===========================

(``| [rows, ...]``: the dropless path, one row per routed choice, sorted by expert.)
"""

from __future__ import annotations

from jax.ad_checkpoint import checkpoint_name

ATTENTION_QKV = "attention_qkv"
ATTENTION_OUT = "attention_out"
MLP_HIDDEN = "mlp_hidden"
MLP_OUT = "mlp_out"
ROUTER_LOGITS = "router_logits"
MOE_DISPATCHED = "moe_dispatched"
MOE_EXPERT_HIDDEN = "moe_expert_hidden"
MOE_EXPERT_OUT = "moe_expert_out"
MOE_OUT = "moe_out"

CHECKPOINT_NAMES = (
    ATTENTION_QKV, ATTENTION_OUT, MLP_HIDDEN, MLP_OUT, ROUTER_LOGITS, MOE_DISPATCHED,
    MOE_EXPERT_HIDDEN, MOE_EXPERT_OUT, MOE_OUT,
)

__all__ = ["CHECKPOINT_NAMES", "checkpoint_name", *[n.upper() for n in CHECKPOINT_NAMES]]
