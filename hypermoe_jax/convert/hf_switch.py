"""Hugging Face ``SwitchTransformers`` (and dense ``T5``) <-> this project's encoder-decoder.

Configs. ``config_from_hf`` reads a Hugging Face ``config.json`` (``model_type``
``switch_transformers`` or ``t5``) into a ``TransformerConfig`` plus the model's loss settings,
with Hugging Face's semantics switched on where they differ from ours:

* ``sparse_placement='hf'``: block i of a stack is sparse when ``i % step == 1`` (every block
  for step 1), any number of layers, separate encoder / decoder steps (``encoder_sparse_step`` /
  ``decoder_sparse_step`` of the config, else ``num_layers // num_sparse_*_layers``);
* ``DispatchConfig.expert_capacity``: the config's integer ``expert_capacity`` per expert and
  sequence (one routing group per sequence), in training and evaluation;
* ``padding_semantics='hf'``: padding is routed like real tokens and only padded keys are masked;
* ``router_loss_pooling='hf'``: router losses pooled per stack and summed over the stacks, with the
  config's ``router_z_loss_coef`` / ``router_aux_loss_coef``; no output z-loss;
* ``dropped_token_behavior``: ``zero`` (a capacity-dropped token gets 0, current transformers) or
  ``scale_input`` (``p * x``, transformers 4.30 and the official HyperMoE code).

Weights. Hugging Face ``nn.Linear`` weights are ``[out, in]``; ours are ``[in, out]`` kernels with
the heads split out (``query`` ``[d, H, D]``, ``out`` ``[H, D, d]``), experts stacked on a leading
``[E]`` axis, the relative position table ``[H, buckets]`` (Hugging Face: ``[buckets, H]`` in block
0 of each stack), and layers stacked on a leading ``[P]`` axis when scanned. ``params_from_hf``
and ``params_to_hf`` are exact inverses on every tensor (no arithmetic but transposes and
reshapes), so a round trip reproduces the Hugging Face tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from hypermoe_jax.architectures import stacks
from hypermoe_jax.architectures.config import TransformerConfig, stack_layout
from hypermoe_jax.convert import trees
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig
from hypermoe_jax.layers.variants import MoeConfig, moe_config

SWITCH = "switch_transformers"
T5 = "t5"
MODEL_TYPES = (SWITCH, T5)
# Hugging Face activation names -> ours (``gelu_new`` is the tanh approximation, as ours).
_ACTIVATIONS = {"relu": "relu", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "silu": "silu",
                "gated-gelu": "gated-gelu", "gated-silu": "gated-silu"}
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu_new", "silu": "silu"}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HfModelSettings:
    """What a converted model needs besides its ``TransformerConfig``: the model's loss settings
    (``models.BaseTransformerModel`` keyword arguments) and the MoE layer settings gin binds."""

    transformer: TransformerConfig
    model_kwargs: dict[str, Any]
    model_type: str
    num_experts: int | None
    expert_capacity: int | None
    jitter_noise: float
    router_bias: bool
    lm_head_from_embedding: bool = False


def _hf_sparse_step(hf: Mapping[str, Any], stack: str) -> int | None:
    """A stack's sparse step as transformers computes it: the config's ``<stack>_sparse_step``
    when present, else ``layers // num_sparse_<stack>_layers`` (``layers`` when that is 0)."""
    key = f"{stack}_sparse_step"
    if key in hf and hf[key] is not None:
        return int(hf[key])
    layers = hf["num_layers"] if stack == "encoder" else hf.get("num_decoder_layers") \
        or hf["num_layers"]
    sparse = int(hf.get(f"num_sparse_{stack}_layers", 3))
    return layers // sparse if sparse > 0 else layers


def _activation(hf: Mapping[str, Any], model_type: str) -> str:
    if model_type == T5:
        proj = hf.get("feed_forward_proj", "relu")
        name = "gated-gelu" if proj == "gated-gelu" else proj
        if proj.startswith("gated-") and proj != "gated-gelu":
            name = "gated-" + _ACTIVATIONS.get(proj[len("gated-"):], proj[len("gated-"):])
    else:
        name = hf.get("dense_act_fn", "relu")
    if name not in _ACTIVATIONS:
        raise ConversionError(
            f"Activation {name!r} of the Hugging Face config has no equivalent here; supported: "
            f"{sorted(_ACTIVATIONS)}.")
    return _ACTIVATIONS[name]


def config_from_hf(
    hf: Mapping[str, Any],
    *,
    variant: str = "switch",
    dropped_token_behavior: str = "zero",
    scan_layers: bool = True,
    dtype: str = "float32",
    moe_overrides: Mapping[str, Any] | None = None,
) -> HfModelSettings:
    """The ``TransformerConfig`` and model settings of a Hugging Face ``config.json``.

    ``variant``: the MoE variant to build on the checkpoint's dims (``switch`` reproduces the
    Hugging Face model; ``hypermoe`` / ``moe_share`` / ``hyperrouter`` / ``smoe_dropout`` add what
    a Switch checkpoint lacks). A dense ``t5`` config gives a dense model.
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConversionError(
            f"config.json has model_type {model_type!r}; this converter reads {MODEL_TYPES} "
            "(Switch Transformers, e.g. google/switch-base-8, or dense T5 / T5 v1.1).")
    activation = _activation(hf, model_type)
    # Tied output layer, logits scaled by d^-0.5. transformers >= 5 writes T5 v1.1 folders as
    # tied *without* the scaling (``scale_decoder_outputs: false``): that is an untied output
    # layer here, initialised from the embedding (the same logits).
    tied = bool(hf.get("tie_word_embeddings", True))
    tied_and_scaled = tied and bool(hf.get("scale_decoder_outputs", True))
    lm_head_from_embedding = tied and not tied_and_scaled
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        emb_dim=int(hf["d_model"]),
        num_heads=int(hf["num_heads"]),
        head_dim=int(hf["d_kv"]),
        mlp_dim=int(hf["d_ff"]),
        num_encoder_layers=int(hf["num_layers"]),
        num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        activation=activation,
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        dropout_broadcast_dims=(),
        logits_via_embedding=tied_and_scaled,
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        sparse_placement="hf",
        padding_semantics="hf",
        scan_layers=scan_layers,
        dtype=np.dtype(dtype),
    )
    model_kwargs = dict(z_loss=0.0, label_smoothing=0.0, router_loss_pooling="hf",
                        aux_loss_factor=0.0, router_z_loss_factor=0.0)
    if model_type == T5:
        if variant != "switch":
            raise ConversionError(
                f"A dense T5 checkpoint converts to a dense model; to build a {variant!r} MoE "
                "model from it use sparse upcycling (python -m hypermoe_jax.convert upcycle).")
        return HfModelSettings(TransformerConfig(**fields), model_kwargs, model_type, None, None,
                               0.0, False, lm_head_from_embedding)
    if dropped_token_behavior not in ("zero", "scale_input"):
        raise ConversionError(f"dropped_token_behavior must be 'zero' or 'scale_input', got "
                              f"{dropped_token_behavior!r}.")
    if activation.startswith("gated-"):
        raise ConversionError("Switch Transformers experts are not gated; config.json names "
                              f"{activation!r}.")
    capacity = int(hf.get("expert_capacity", 64))
    jitter = float(hf.get("router_jitter_noise", 0.01))
    bias = bool(hf.get("router_bias", False))
    overrides = dict(moe_overrides or {})
    moe = moe_config(
        variant,
        experts=ExpertsConfig(num_experts=int(hf["num_experts"]),
                              dropout_rate=fields["dropout_rate"]),
        router=RouterConfig(jitter_noise=jitter, use_bias=bias and variant != "hyperrouter",
                            **overrides.pop("router", {})),
        dispatch=DispatchConfig(expert_capacity=capacity,
                                dropped_token_behavior=dropped_token_behavior),
        **overrides,
    )
    fields.update(moe=moe, encoder_sparse_step=_hf_sparse_step(hf, "encoder"),
                  decoder_sparse_step=_hf_sparse_step(hf, "decoder"))
    model_kwargs.update(aux_loss_factor=float(hf.get("router_aux_loss_coef", 0.001)),
                        router_z_loss_factor=float(hf.get("router_z_loss_coef", 0.001)))
    return HfModelSettings(TransformerConfig(**fields), model_kwargs, model_type,
                           moe.num_experts, capacity, jitter, bias, lm_head_from_embedding)


def config_to_hf(cfg: TransformerConfig, *, aux_loss_factor: float = 0.001,
                 router_z_loss_factor: float = 0.001,
                 expert_capacity: int | None = None) -> dict[str, Any]:
    """A ``switch_transformers`` ``config.json`` for a Switch model of ours (``params_to_hf``
    checks that the model is one Hugging Face can hold)."""
    _check_representable(cfg)
    moe: MoeConfig = cfg.moe
    capacity = expert_capacity or moe.dispatch.expert_capacity
    if capacity is None:
        raise ConversionError(
            "Hugging Face Switch Transformers need an integer expert_capacity (slots per expert "
            "and sequence); this model routes with capacity factors. Pass expert_capacity "
            "(e.g. --expert_capacity=64, google/switch-base-8's value).")
    enc, dec = cfg.encoder_sparse_step or 0, cfg.decoder_sparse_step or 0
    n_enc = len(stack_layout(cfg.num_encoder_layers, enc, "hf").sparse_indices)
    n_dec = len(stack_layout(cfg.num_decoder_layers, dec, "hf").sparse_indices)
    return {
        "architectures": ["SwitchTransformersForConditionalGeneration"],
        "model_type": SWITCH,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.emb_dim,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.mlp_dim,
        "num_heads": cfg.num_heads,
        "num_layers": cfg.num_encoder_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_sparse_encoder_layers": n_enc,
        "num_sparse_decoder_layers": n_dec,
        "encoder_sparse_step": enc,
        "decoder_sparse_step": dec,
        "num_experts": moe.num_experts,
        "expert_capacity": int(capacity),
        "router_bias": moe.router.use_bias,
        "router_jitter_noise": moe.router.jitter_noise,
        "router_dtype": "float32",
        "router_ignore_padding_tokens": False,
        "router_z_loss_coef": router_z_loss_factor,
        "router_aux_loss_coef": aux_loss_factor,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "dense_act_fn": _HF_ACTIVATIONS[cfg.activation],
        "tie_word_embeddings": cfg.logits_via_embedding,
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "use_cache": True,
    }


def _check_representable(cfg: TransformerConfig) -> None:
    """Errors unless Hugging Face ``SwitchTransformers`` can hold a model of ``cfg``."""
    if cfg.moe is None:
        raise ConversionError("This model is dense; Hugging Face Switch Transformers hold MoE "
                              "models (a dense model is a T5 checkpoint).")
    if cfg.moe.variant != "switch":
        raise ConversionError(
            f"A {cfg.moe.variant!r} model has weights Hugging Face SwitchTransformers cannot "
            "hold (HyperMoE's generator, HyperRouter's hypernetwork, ...); only Switch models "
            "convert to Hugging Face.")
    if cfg.moe.num_selected != 1 or cfg.activation not in _HF_ACTIVATIONS:
        raise ConversionError(
            "Hugging Face SwitchTransformers route top-1 to ungated experts (relu / gelu / silu); "
            f"this model has num_selected={cfg.moe.num_selected}, activation={cfg.activation!r}.")
    for name, n, step in (("encoder", cfg.num_encoder_layers, cfg.encoder_sparse_step),
                          ("decoder", cfg.num_decoder_layers, cfg.decoder_sparse_step)):
        ours = stack_layout(n, step, cfg.sparse_placement).sparse_indices
        theirs = stack_layout(n, step, "hf").sparse_indices
        if ours != theirs:
            raise ConversionError(
                f"The {name}'s sparse blocks are {ours}; Hugging Face puts a step of {step} at "
                f"{theirs} (i % step == 1), so this model has no Hugging Face equivalent.")


# --------------------------------------------------------------------------------------------
# Weights: one table of (our path, Hugging Face name(s), layout)
# --------------------------------------------------------------------------------------------

KeyPath = trees.Path


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One of our parameters and the Hugging Face tensor(s) it comes from.

    ``kind``: ``copy`` | ``linear`` (``[out, in]`` <-> ``[in, out]``) | ``qkv``
    (``[H*D, d]`` <-> ``[d, H, D]``) | ``attn_out`` (``[d, H*D]`` <-> ``[H, D, d]``) | ``relpos``
    (``[buckets, H]`` <-> ``[H, buckets]``) | ``experts`` (E ``[out, in]`` <-> ``[E, in, out]``).
    """

    path: KeyPath
    hf_names: tuple[str, ...]
    kind: str


def _forward(kind: str, arrays: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """Hugging Face tensors -> our parameter of ``shape``."""
    a = arrays[0]
    if kind == "copy":
        out = a
    elif kind in ("linear", "relpos"):
        out = a.T
    elif kind == "qkv":
        out = a.T.reshape(shape)
    elif kind == "attn_out":
        out = a.T.reshape(shape)
    elif kind == "experts":
        out = np.stack([x.T for x in arrays])
    else:
        raise AssertionError(kind)
    if tuple(out.shape) != tuple(shape):
        raise ConversionError(f"shape {tuple(out.shape)} from the checkpoint, {tuple(shape)} in "
                              "the model")
    return np.ascontiguousarray(out)


def _inverse(kind: str, value: np.ndarray) -> list[np.ndarray]:
    """Our parameter -> its Hugging Face tensors."""
    if kind == "copy":
        out = [value]
    elif kind in ("linear", "relpos"):
        out = [value.T]
    elif kind == "qkv":
        out = [value.reshape(value.shape[0], -1).T]
    elif kind == "attn_out":
        out = [value.reshape(-1, value.shape[-1]).T]
    elif kind == "experts":
        out = [x.T for x in value]
    else:
        raise AssertionError(kind)
    return [np.ascontiguousarray(x) for x in out]


def _block_scope(layout, i: int, scan: bool) -> KeyPath:
    """Our path (below the stack) of block i, in the unrolled form when ``scan`` is False."""
    n = len(layout.pattern)
    if i < layout.periods * n:
        p, j = divmod(i, n)
        pattern = layout.pattern
        container = "layers" if scan else f"layers_{p}"
    else:
        j = i - layout.periods * n
        pattern, container = layout.tail, "tail"
    name = "sparse" if pattern[j] else f"dense_{sum(1 for s in pattern[:j] if not s)}"
    return (container, name)


def block_scopes(cfg: TransformerConfig, stack: str) -> list[tuple[KeyPath, bool]]:
    """``[(our unrolled path below the stack, sparse)]`` of every block of a stack, in order."""
    n, step = ((cfg.num_encoder_layers, cfg.encoder_sparse_step) if stack == "encoder"
               else (cfg.num_decoder_layers, cfg.decoder_sparse_step))
    layout = stack_layout(n, step, cfg.sparse_placement)
    return [(_block_scope(layout, i, scan=False), sparse)
            for i, sparse in enumerate(layout.blocks)]


def _attention(ours: KeyPath, hf: str) -> list[Tensor]:
    return [Tensor(ours + ("query",), (f"{hf}.q.weight",), "qkv"),
            Tensor(ours + ("key",), (f"{hf}.k.weight",), "qkv"),
            Tensor(ours + ("value",), (f"{hf}.v.weight",), "qkv"),
            Tensor(ours + ("out",), (f"{hf}.o.weight",), "attn_out")]


def tensor_table(cfg: TransformerConfig, model_type: str = SWITCH,
                 num_experts: int | None = None) -> list[Tensor]:
    """Every parameter of the Hugging Face model, as our (unrolled) path and its source."""
    gated = cfg.activation.startswith("gated-")
    mlp_names = ("wi_0", "wi_1", "wo") if gated else ("wi", "wo")
    dense_mlp = "DenseReluDense" if model_type == T5 else "mlp"
    table = [Tensor(("token_embedder", "embedding"), ("shared.weight",), "copy")]
    if not cfg.logits_via_embedding:
        table.append(Tensor(("logits_dense",), ("lm_head.weight",), "linear"))
    for stack in ("encoder", "decoder"):
        table.append(Tensor((stack, "relpos_bias", "rel_embedding"),
                            (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias"
                             ".weight",), "relpos"))
        table.append(Tensor((stack, "final_norm", "scale"),
                            (f"{stack}.final_layer_norm.weight",), "copy"))
        ff = 1 if stack == "encoder" else 2
        for i, (scope, sparse) in enumerate(block_scopes(cfg, stack)):
            ours, hf = (stack,) + scope, f"{stack}.block.{i}.layer"
            table += _attention(ours + ("self_attention",), f"{hf}.0.SelfAttention")
            table.append(Tensor(ours + ("self_attention_norm", "scale"),
                                (f"{hf}.0.layer_norm.weight",), "copy"))
            if stack == "decoder":
                table += _attention(ours + ("cross_attention",), f"{hf}.1.EncDecAttention")
                table.append(Tensor(ours + ("cross_attention_norm", "scale"),
                                    (f"{hf}.1.layer_norm.weight",), "copy"))
            table.append(Tensor(ours + ("mlp_norm", "scale"), (f"{hf}.{ff}.layer_norm.weight",),
                                "copy"))
            if not sparse:
                for name in mlp_names:
                    table.append(Tensor(ours + ("mlp", name),
                                        (f"{hf}.{ff}.{dense_mlp}.{name}.weight",), "linear"))
                continue
            experts = num_experts or cfg.moe.num_experts
            moe = ours + ("mlp", "moe")
            table.append(Tensor(moe + ("router", "kernel"),
                                (f"{hf}.{ff}.mlp.router.classifier.weight",), "linear"))
            if cfg.moe.router.use_bias:
                table.append(Tensor(moe + ("router", "bias"),
                                    (f"{hf}.{ff}.mlp.router.classifier.bias",), "copy"))
            for name in mlp_names:
                table.append(Tensor(
                    moe + ("experts", name),
                    tuple(f"{hf}.{ff}.mlp.experts.expert_{e}.{name}.weight"
                          for e in range(experts)), "experts"))
    return table


# Tensors a Hugging Face file may hold that are copies of others (tied embeddings).
_TIED = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


@dataclasses.dataclass
class ConvertedParams:
    """``params`` (our tree, only the parameters the checkpoint holds, in the model's scanned or
    unrolled form), ``missing`` (model parameters the checkpoint lacks: they keep their
    initialisation) and ``unused`` (checkpoint tensors this model has no place for)."""

    params: dict
    missing: list[str]
    unused: list[str]


def params_from_hf(
    state: Mapping[str, np.ndarray],
    cfg: TransformerConfig,
    abstract_params: Mapping,
    *,
    model_type: str = SWITCH,
    num_experts: int | None = None,
    lm_head_from_embedding: bool = False,
    dtype: Any = np.float32,
) -> ConvertedParams:
    """Hugging Face tensors -> our ``params`` for a model of ``cfg`` whose (unboxed) parameter
    shapes are ``abstract_params`` (e.g. ``jax.eval_shape`` of its init).

    Parameters of the model that the checkpoint lacks (HyperMoE's generator, ...) are left out and
    listed in ``missing``; checkpoint tensors the model has no place for (a Switch router under
    HyperRouter, ...) are listed in ``unused``; a tensor the model needs in another shape, or one
    the table names but the file lacks, is an error. ``lm_head_from_embedding``: the untied
    output layer is the embedding (``HfModelSettings.lm_head_from_embedding``).
    """
    if lm_head_from_embedding and "lm_head.weight" not in state:
        state = {**state, "lm_head.weight": state["shared.weight"]}
    table = tensor_table(cfg, model_type, num_experts)
    absent = sorted({n for t in table for n in t.hf_names if n not in state})
    if absent:
        raise ConversionError(
            f"The checkpoint lacks {len(absent)} tensor(s) its config.json implies, e.g. "
            f"{absent[:3]}; the config and the weights do not belong together (or the file is a "
            "different architecture).")
    target = trees.flatten(jax.eval_shape(stacks.unstack_layers, dict(abstract_params)))
    converted, unused, used = {}, [], set(_TIED)
    for t in table:
        used.update(t.hf_names)
        if t.path not in target:
            unused.extend(t.hf_names)
            continue
        try:
            value = _forward(t.kind, [np.asarray(state[n]) for n in t.hf_names],
                             tuple(target[t.path].shape))
        except ConversionError as e:
            raise ConversionError(f"{'/'.join(t.path)} (from {t.hf_names[0]}): {e}; the model "
                                  "config does not match the checkpoint.") from None
        converted[t.path] = value.astype(dtype)
    if not cfg.logits_via_embedding and "lm_head.weight" not in state:
        raise ConversionError("The config unties the output layer but lm_head.weight is absent.")
    unused += sorted(n for n in state if n not in used and not
                     (cfg.logits_via_embedding and n == "lm_head.weight"))
    missing = sorted("/".join(p) for p in target if p not in converted)
    params = trees.unflatten(converted)
    if cfg.scan_layers:
        params = stacks.stack_layers(params)
    return ConvertedParams(params, missing, unused)


def params_to_hf(params: Mapping, cfg: TransformerConfig) -> dict[str, np.ndarray]:
    """Our Switch model's ``params`` (scanned or unrolled) -> Hugging Face
    ``SwitchTransformersForConditionalGeneration`` tensors (float32)."""
    _check_representable(cfg)
    flat = trees.flatten(stacks.unstack_layers(dict(params)))
    out: dict[str, np.ndarray] = {}
    for t in tensor_table(cfg, SWITCH):
        if t.path not in flat:
            raise ConversionError(f"The parameters lack {'/'.join(t.path)}; they are not of a "
                                  "model built from this config.")
        for name, value in zip(t.hf_names, _inverse(t.kind, np.asarray(flat[t.path])),
                               strict=True):
            out[name] = value.astype(np.float32)
    if cfg.logits_via_embedding:
        out["lm_head.weight"] = out["shared.weight"]
    for name in _TIED:
        out[name] = out["shared.weight"]
    return out


def hf_router_layers(cfg: TransformerConfig) -> dict[str, tuple[str, int]]:
    """Hugging Face router module name -> (stack, index among that stack's MoE layers)."""
    out = {}
    for stack in ("encoder", "decoder"):
        ff = 1 if stack == "encoder" else 2
        sparse_blocks = [i for i, (_, s) in enumerate(block_scopes(cfg, stack)) if s]
        for j, i in enumerate(sparse_blocks):
            out[f"{stack}.block.{i}.layer.{ff}.mlp.router"] = (stack, j)
    return out
