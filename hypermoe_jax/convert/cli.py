"""``python -m hypermoe_jax.convert``: start from real checkpoints, and share results.

    # Hugging Face Switch Transformers (a local folder, or a hub id when online) -> DEST
    python -m hypermoe_jax.convert hf-switch google/switch-base-8 /ckpt/switch_base_8
    python -m hypermoe_jax.convert hf-switch SRC DEST --variant=hypermoe     # HyperMoE on Switch
    # a dense Hugging Face T5 / T5 v1.1 checkpoint -> DEST (a dense model of ours)
    python -m hypermoe_jax.convert hf-t5 google/t5-v1_1-base /ckpt/t5_base
    # our Switch model (gin + checkpoint) -> a Hugging Face folder
    python -m hypermoe_jax.convert to-hf --gin_file=DEST/model.gin CHECKPOINT HF_DEST
    # sparse upcycling: an MoE model (any variant, same dims) from a dense checkpoint
    python -m hypermoe_jax.convert upcycle /ckpt/t5_base/checkpoint /ckpt/upcycled \
        --dense_gin_file=/ckpt/t5_base/model.gin --gin_file=MOE_MODEL_GIN

``DEST`` receives an orbax checkpoint, ``model.gin``, ``finetune.gin`` (fine-tune with
``python -m hypermoe_jax.train --gin_file=DEST/finetune.gin ...``), ``t5x_model.gin`` and
``conversion.json`` (``checkpoint_files``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from hypermoe_jax.convert import checkpoint_files, hf_io, hf_switch
from hypermoe_jax.training.gin_utils import model_from_gin

_INPUT_SHAPES = {"encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8),
                 "decoder_target_tokens": (1, 8)}


def build_model(settings: hf_switch.HfModelSettings, **model_kwargs: Any):
    """The ``models.EncoderDecoderModel`` of converted settings (loss settings included)."""
    from hypermoe_jax import architectures as arch
    from hypermoe_jax import models

    return models.EncoderDecoderModel(arch.EncoderDecoder(settings.transformer),
                                      **{**settings.model_kwargs, **model_kwargs})


def abstract_variables(model) -> dict:
    """Unboxed ``ShapeDtypeStruct`` variables of a model (nothing allocated)."""
    return nn.unbox(jax.eval_shape(
        lambda rng: model.get_initial_variables(rng, _INPUT_SHAPES), jax.random.PRNGKey(0)))


def hf_gin_settings(settings: hf_switch.HfModelSettings, variant: str,
                    dropped_token_behavior: str) -> tuple[list[str], dict, list]:
    """(imports, macros, blocks) of the model gin of converted settings."""
    cfg = settings.transformer
    dense = settings.num_experts is None
    macros = {
        "MODEL_SIZE": "base",  # the dims are bound below
        "MOE_VARIANT": variant,
        "NUM_EXPERTS": settings.num_experts or 8,
        "NUM_EMBEDDINGS": cfg.vocab_size,
        "TIED_EMBEDDINGS": cfg.logits_via_embedding,
        "DROPOUT_RATE": cfg.dropout_rate,
        "JITTER_NOISE": settings.jitter_noise,
        "AUX_LOSS_FACTOR": settings.model_kwargs["aux_loss_factor"],
        "ROUTER_Z_LOSS_FACTOR": settings.model_kwargs["router_z_loss_factor"],
        "Z_LOSS": 0.0,
        "LABEL_SMOOTHING": 0.0,
    }
    sizes_bindings = dict(
        emb_dim=cfg.emb_dim, mlp_dim=cfg.mlp_dim, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_encoder_layers=cfg.num_encoder_layers, num_decoder_layers=cfg.num_decoder_layers,
        activation=cfg.activation, layer_norm_epsilon=cfg.layer_norm_epsilon,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        encoder_sparse_step=cfg.encoder_sparse_step or 0,
        decoder_sparse_step=cfg.decoder_sparse_step or 0,
        sparse_placement=cfg.sparse_placement, padding_semantics=cfg.padding_semantics,
        dropout_broadcast_dims=tuple(cfg.dropout_broadcast_dims),
    )
    blocks = [("sizes.sparse_t5", sizes_bindings),
              ("models.EncoderDecoderModel", {"router_loss_pooling": "hf"})]
    if not dense:
        blocks += [("experts.ExpertsConfig", {"dropout_rate": cfg.dropout_rate}),
                   ("routers.RouterConfig", {"use_bias": settings.router_bias}),
                   ("dispatch.DispatchConfig",
                    {"expert_capacity": settings.expert_capacity,
                     "dropped_token_behavior": dropped_token_behavior})]
    imports = ["hypermoe_jax.models", "hypermoe_jax.architectures.sizes",
               "hypermoe_jax.layers.experts", "hypermoe_jax.layers.routers",
               "hypermoe_jax.layers.dispatch"]
    return imports, macros, blocks


def convert_hf(src: str, dest: str, *, variant: str = "switch",
               dropped_token_behavior: str = "zero", scan_layers: bool = True,
               overwrite: bool = False, expect: str | None = None, t5x_checkpoint: bool = False,
               log=print) -> dict:
    """Converts a Hugging Face folder (or hub id) into ``dest``; returns the conversion record."""
    folder = hf_io.resolve_source(src)
    hf = hf_io.read_config(folder)
    if expect and hf.get("model_type") != expect:
        other = {"t5": "hf-t5", "switch_transformers": "hf-switch"}.get(hf.get("model_type"))
        raise hf_switch.ConversionError(
            f"{src} holds a {hf.get('model_type')!r} model, not {expect!r}"
            + (f"; use `python -m hypermoe_jax.convert {other}`." if other else "."))
    settings = hf_switch.config_from_hf(hf, variant=variant, scan_layers=scan_layers,
                                        dropped_token_behavior=dropped_token_behavior)
    model = build_model(settings)
    abstract = abstract_variables(model)
    state = hf_io.read_state_dict(folder)
    converted = hf_switch.params_from_hf(state, settings.transformer, abstract["params"],
                                         model_type=settings.model_type,
                                         num_experts=settings.num_experts,
                                         lm_head_from_embedding=settings.lm_head_from_embedding)
    out = checkpoint_files.prepare_destination(dest, overwrite)
    ckpt = checkpoint_files.save_params(out, converted.params)
    missing_mutables = sorted(k for k in abstract if k != "params")
    imports, macros, blocks = hf_gin_settings(settings, variant, dropped_token_behavior)
    header = [f"{variant} on the weights of {src} ({hf.get('model_type')}),",
              "with Hugging Face's semantics: sparse blocks at i % step == 1, expert_capacity",
              "slots per expert and sequence, padding routed and only padded keys masked, router",
              "losses pooled per stack. Written by `python -m hypermoe_jax.convert`."]
    gins = checkpoint_files.write_gin_files(
        out, header=header, imports=imports, macros=macros, blocks=blocks,
        allow_missing=bool(converted.missing or missing_mutables))
    n_params = int(sum(np.prod(v.shape) for v in jax.tree.leaves(converted.params)))
    record = {"source": str(src), "source_folder": str(folder),
              "model_type": hf.get("model_type"), "variant": variant,
              "dropped_token_behavior": dropped_token_behavior, "checkpoint": str(ckpt),
              "gin": {k: str(v) for k, v in gins.items()}, "converted_parameters": n_params,
              "missing": converted.missing, "missing_collections": missing_mutables,
              "unused": converted.unused}
    if t5x_checkpoint:
        from hypermoe_jax.t5x_support import checkpoints as t5x_checkpoints

        path, _ = t5x_checkpoints.write_t5x_checkpoint([str(gins["t5x_model"])],
                                                       converted.params, out / "t5x")
        record["t5x_checkpoint"] = str(path)
    checkpoint_files.write_record(out, record)
    log(f"Converted {src} -> {out}: {n_params:,} parameters.")
    if converted.missing or missing_mutables:
        log(f"  {len(converted.missing)} parameter(s) not in the source start from their "
            f"initialisation when fine-tuning (e.g. {converted.missing[:2]}"
            f"{', collections ' + str(missing_mutables) if missing_mutables else ''}).")
    if converted.unused:
        log(f"  {len(converted.unused)} source tensor(s) have no place in a {variant} model "
            f"(e.g. {converted.unused[:2]}).")
    log(f"  Fine-tune: python -m hypermoe_jax.train --gin_file={gins['finetune']} "
        "--gin.MODEL_DIR=... --gin.MIXTURE_OR_TASK_NAME=...")
    if t5x_checkpoint:
        log(f"  With T5X: python -m t5x.train --gin_search_paths=GIN_DIR "
            f"--gin_file={gins['t5x_model']} --gin_file=t5x/runs/finetune.gin "
            f"--gin.INITIAL_CHECKPOINT_PATH=\\'{record['t5x_checkpoint']}\\' ...")
    return record


def convert_to_hf(gin_files: Sequence[str], checkpoint: str, dest: str, *,
                  bindings: Sequence[str] = (), expert_capacity: int | None = None,
                  overwrite: bool = False, log=print) -> Path:
    """Our Switch model (model gin + checkpoint) -> a Hugging Face folder at ``dest``."""
    from hypermoe_jax.training import checkpoints

    model = model_from_gin(gin_files, bindings)
    cfg = model.config
    hf_config = hf_switch.config_to_hf(cfg, aux_loss_factor=model.aux_loss_factor,
                                       router_z_loss_factor=model.router_z_loss_factor,
                                       expert_capacity=expert_capacity)
    abstract = abstract_variables(model)
    params, _, _ = checkpoints.restore_params(checkpoint, abstract["params"])
    tensors = hf_switch.params_to_hf(params, cfg)
    out = hf_io.write_hf_folder(dest, hf_config, tensors, overwrite=overwrite)
    log(f"Wrote {out} ({len(tensors)} tensors); load it with transformers' "
        "SwitchTransformersForConditionalGeneration.from_pretrained.")
    return out


def upcycle(dense_checkpoint: str, dest: str, *, dense_gin_files: Sequence[str],
            gin_files: Sequence[str], bindings: Sequence[str] = (), seed: int = 0,
            overwrite: bool = False, log=print) -> dict:
    """Sparse upcycling: the MoE model of ``gin_files`` from the dense model of
    ``dense_gin_files`` + ``dense_checkpoint`` (``convert.upcycle``), written to ``dest``."""
    from hypermoe_jax.convert import upcycle as upcycle_lib
    from hypermoe_jax.training import checkpoints, gin_utils

    dense = model_from_gin(dense_gin_files)
    params, mutables, _ = checkpoints.restore_params(
        dense_checkpoint, abstract_variables(dense)["params"])
    moe = model_from_gin(gin_files, bindings)
    variables, kept = upcycle_lib.upcycle_model_variables(
        {"params": params, **mutables}, dense.config, moe, jax.random.PRNGKey(seed))
    out = checkpoint_files.prepare_destination(dest, overwrite)
    ckpt = checkpoint_files.save_params(
        out, variables["params"], {k: v for k, v in variables.items() if k != "params"})
    lines = [f"# {moe.config.moe.variant if moe.config.moe else 'dense'} model upcycled from "
             f"{dense_checkpoint} by `python -m hypermoe_jax.convert upcycle`."]
    lines += [f"include '{Path(f).absolute() if Path(f).exists() else f}'" for f in gin_files]
    lines += [gin_utils.format_binding(*(x.strip() for x in b.split("=", 1))) for b in bindings]
    model_gin = out / "model.gin"
    model_gin.write_text("\n".join(lines) + "\n")
    finetune = out / "finetune.gin"
    finetune.write_text("\n".join([
        "# Fine-tunes the upcycled model with this project's trainer:",
        f"#   python -m hypermoe_jax.train --gin_file={finetune} --gin.MODEL_DIR=... ...",
        f"include '{model_gin}'", "include 'runs/finetune.gin'", "",
        f"INITIAL_CHECKPOINT_PATH = '{ckpt}'"]) + "\n")
    record = {"dense_checkpoint": str(dense_checkpoint), "dense_gin": list(dense_gin_files),
              "gin": list(gin_files), "bindings": list(bindings), "seed": seed,
              "checkpoint": str(ckpt), "kept_initialisation": kept}
    checkpoint_files.write_record(out, record)
    log(f"Upcycled {dense_checkpoint} -> {out}; {len(kept)} variable(s) kept their "
        f"initialisation (routers, ...). Fine-tune: python -m hypermoe_jax.train "
        f"--gin_file={finetune} --gin.MODEL_DIR=... --gin.MIXTURE_OR_TASK_NAME=...")
    return record


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hypermoe_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("hf-switch", "Hugging Face Switch Transformers -> DEST"),
                        ("hf-t5", "Hugging Face dense T5 / T5 v1.1 -> DEST")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("src", help="a local Hugging Face folder (config.json + weights) or a "
                                   "hub id (online)")
        c.add_argument("dest", help="a new or empty directory")
        if name == "hf-switch":
            c.add_argument("--variant", default="switch",
                           choices=("switch", "hypermoe", "moe_share", "hyperrouter",
                                    "smoe_dropout"),
                           help="the MoE variant to build on the Switch weights")
            c.add_argument("--dropped_token_behavior", default="zero",
                           choices=("zero", "scale_input"),
                           help="what a capacity-dropped token gets: 0 (transformers >= 4.31) "
                                "or p*x (4.30, the official HyperMoE code)")
        c.add_argument("--no_scan_layers", action="store_true",
                       help="unrolled layers instead of nn.scan")
        c.add_argument("--t5x_checkpoint", action="store_true",
                       help="also write DEST/t5x/checkpoint_0, a T5X train state for the "
                            "upstream t5x.train (needs T5X installed)")
        c.add_argument("--overwrite", action="store_true", help="replace what DEST holds")
    c = sub.add_parser("to-hf", help="our Switch model -> a Hugging Face folder")
    c.add_argument("checkpoint", help="a run directory, a step directory or a converted "
                                      "DEST/checkpoint")
    c.add_argument("dest", help="a new or empty directory")
    c.add_argument("--gin_file", action="append", required=True, help="the model gin(s)")
    c.add_argument("--gin", action="append", default=[], dest="bindings",
                   help="a gin binding NAME=VALUE (repeatable)")
    c.add_argument("--expert_capacity", type=int, default=None,
                   help="Hugging Face's integer slots per expert and sequence (needed when the "
                        "model routes with capacity factors)")
    c.add_argument("--overwrite", action="store_true")
    c = sub.add_parser("upcycle", help="an MoE model from a dense checkpoint (sparse upcycling)")
    c.add_argument("dense_checkpoint", help="the dense model's checkpoint (e.g. DEST/checkpoint "
                                            "of hf-t5, or a run directory)")
    c.add_argument("dest", help="a new or empty directory")
    c.add_argument("--dense_gin_file", action="append", required=True,
                   help="the dense model's gin (e.g. DEST/model.gin of hf-t5)")
    c.add_argument("--gin_file", action="append", required=True,
                   help="the MoE model's gin (same dims; e.g. models/switch_base_8.gin)")
    c.add_argument("--gin", action="append", default=[], dest="bindings",
                   help="a gin binding of the MoE model NAME=VALUE (repeatable)")
    c.add_argument("--seed", type=int, default=0, help="initialises what the dense model lacks")
    c.add_argument("--overwrite", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("hf-switch", "hf-t5"):
            convert_hf(args.src, args.dest, scan_layers=not args.no_scan_layers,
                       variant=getattr(args, "variant", "switch"),
                       dropped_token_behavior=getattr(args, "dropped_token_behavior", "zero"),
                       overwrite=args.overwrite, t5x_checkpoint=args.t5x_checkpoint,
                       expect="t5" if args.command == "hf-t5" else "switch_transformers")
        elif args.command == "upcycle":
            upcycle(args.dense_checkpoint, args.dest, dense_gin_files=args.dense_gin_file,
                    gin_files=args.gin_file, bindings=args.bindings, seed=args.seed,
                    overwrite=args.overwrite)
        else:
            convert_to_hf(args.gin_file, args.checkpoint, args.dest, bindings=args.bindings,
                          expert_capacity=args.expert_capacity, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
