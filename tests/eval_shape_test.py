"""Full-size configs via ``jax.eval_shape`` (no memory allocated): parameter counts.

Published references: T5 v1.1 base 248M; google/switch-base-8 ~620M (HF model card / checkpoint,
tied input/output embeddings).
"""

import jax
import numpy as np
import pytest
from flax import linen as nn

from hypermoe_jax import architectures as arch
from hypermoe_jax import models
from hypermoe_jax.architectures import sizes
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.variants import moe_config

# Hand count of Switch-base-8 (ReLU experts and dense MLPs of d_ff 3072: wi + wo), for the record:
D, F, V, E = 768, 3072, 32128, 8
ATTN = 4 * D * D
MLP = 2 * D * F
SWITCH_BASE_8 = (
    6 * (ATTN + MLP) + 6 * (ATTN + E * MLP + D * E)  # encoder: dense + sparse blocks
    + 6 * (2 * ATTN + MLP) + 6 * (2 * ATTN + E * MLP + D * E)  # decoder
    + (2 * 12 + 1 + 3 * 12 + 1) * D  # RMSNorm scales
    + 2 * 32 * 12  # relative position tables (one per stack)
    + V * D  # shared token embedding, tied to the output
)


def test_switch_base_8_matches_published_count():
    counts = sizes.parameter_counts(sizes.switch_base_8())
    assert counts["params"] == SWITCH_BASE_8
    assert abs(counts["params"] / 620e6 - 1) < 0.01, counts
    # Untied output embeddings (T5 v1.1 style) add one [vocab, d] matrix: ~644M, 3.9% over.
    untied = sizes.parameter_counts(sizes.switch_base_8(tied_embeddings=False))
    assert untied["params"] - counts["params"] == V * D


# google/switch-base-8's config.json on the Hugging Face hub (the fields that shape the model).
SWITCH_BASE_8_HF_CONFIG = {
    "model_type": "switch_transformers", "vocab_size": 32128, "d_model": 768, "d_kv": 64,
    "d_ff": 3072, "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12,
    "num_sparse_encoder_layers": 6, "num_sparse_decoder_layers": 6, "num_experts": 8,
    "expert_capacity": 64, "dense_act_fn": "relu", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "tie_word_embeddings": True, "router_bias": False,
    "router_jitter_noise": 0.01, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
}


def test_switch_base_8_preset_is_google_switch_base_8():
    """Our preset has the published model's dims (the converter reads the config the same way),
    so a converted google/switch-base-8 checkpoint fits models/switch_base_8.gin's shapes."""
    from hypermoe_jax.convert import hf_switch

    ours = sizes.switch_base_8()
    theirs = hf_switch.config_from_hf(SWITCH_BASE_8_HF_CONFIG).transformer
    for field in ("vocab_size", "emb_dim", "num_heads", "head_dim", "mlp_dim", "activation",
                  "num_encoder_layers", "num_decoder_layers", "encoder_sparse_step",
                  "decoder_sparse_step", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "logits_via_embedding"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.moe.num_experts == theirs.moe.num_experts == 8
    assert arch.sparse_layer_indices(12, 2) == arch.sparse_layer_indices(12, 2, "hf")
    assert sizes.parameter_counts(ours) == sizes.parameter_counts(theirs)


def test_t5_1_1_base_dense_count():
    counts = sizes.parameter_counts(sizes.t5_1_1("base"))
    assert abs(counts["params"] / 248e6 - 1) < 0.01, counts


@pytest.mark.parametrize(
    "name", ["hypermoe_base_8", "hyperrouter_base_8", "smoe_dropout_base_8", "moe_share_base_8"]
)
def test_variant_base_8_counts(name, record_property):
    counts = sizes.parameter_counts(getattr(sizes, name)())
    switch = SWITCH_BASE_8
    extra = counts["params"] - switch
    record_property("params", counts["params"])
    record_property("frozen", counts.get("frozen", 0))
    print(f"{name}: params {counts['params']:,} (+{extra:,} vs Switch), "
          f"frozen {counts.get('frozen', 0):,}")
    num_moe = 12  # 6 per stack
    if name == "hypermoe_base_8":
        # Per stack: expert embeddings, selection MLPs and layer embeddings per MoE layer, and ONE
        # hypernetwork (input 128 + 10 -> 128 -> four heads generating a d x 64 bottleneck).
        h, b, de, s = 128, 64, 128, 128
        per_layer = E * de + de * h + h + h * s + s + 10
        hypernet = (s + 10) * h + h + (h + 1) * (D * b + b + b * D + D)
        assert extra == 2 * (6 * per_layer + hypernet)
    elif name == "hyperrouter_base_8":
        # The router kernel [d, E] becomes a trainable embedding r [d]; the hypernetwork is frozen.
        assert extra == num_moe * (D - D * E)
        assert counts["frozen"] == num_moe * (D * 256 + 256 + 256 * E * (D + 1) + E * (D + 1))
    elif name == "smoe_dropout_base_8":
        assert extra == -num_moe * D * E  # the random router is frozen
        assert counts["frozen"] == num_moe * D * E
    else:
        assert extra == num_moe * (2 * D * 64 + 64 + D)  # one static adapter per MoE layer


def test_large_scanned_config_shapes_have_layer_axis():
    cfg = sizes.sparse_t5("large", moe_config("hypermoe", experts=ExpertsConfig(num_experts=16)),
                          remat_policy="full")
    module = arch.EncoderDecoder(cfg)
    tokens = np.ones((2, 16), np.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), tokens, tokens, tokens,
                                               enable_dropout=False))
    params = nn.unbox(boxed)["params"]
    # 24 blocks -> 12 (dense, sparse) periods stacked on the leading axis.
    assert params["encoder"]["layers"]["sparse"]["mlp"]["moe"]["experts"]["wo"].shape == (
        12, 16, 2816, 1024)
    assert params["decoder"]["hyper_generator"]["expert_embedding"].shape == (12, 16, 128)
    assert params["decoder"]["hyper_generator"]["hypernet"]["w_down_kernel"].shape == (
        128, 1024, 64)


def test_decoder_only_and_model_initial_variables_shapes():
    cfg = sizes.decoder_only("base", moe_config("switch", experts=ExpertsConfig(num_experts=8)),
                             num_layers=12, vocab_size=32128)
    model = models.DecoderOnlyModel(arch.DecoderOnly(cfg))
    shapes = {"decoder_input_tokens": (4, 32), "decoder_target_tokens": (4, 32),
              "decoder_loss_weights": (4, 32)}
    boxed = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    assert set(boxed) == {"params"}
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(boxed)))
    counts = sizes.parameter_counts(cfg, decoder_only=True)
    assert n == counts["total"]
    # 6 dense (attention + MLP) + 6 sparse blocks, untied embeddings.
    want = 6 * (ATTN + MLP) + 6 * (ATTN + E * MLP + D * E) + (2 * 12 + 1) * D + 32 * 12 + 2 * V * D
    assert n == want
