"""Speed: the full training step of dense T5 1.1, Switch, HyperMoE, HyperRouter and SMoE-Dropout.

One jitted step = forward, backward and the optimizer update (Adafactor, the project's
``training.optimizers``) of an encoder-decoder at T5 v1.1 dims, in bf16 (float32 parameters,
bfloat16 activations, float32 router), on one device of whatever backend is present. Inference is
the teacher-forced forward pass of the same models (eval mode). The models' repetitions are
interleaved (each repetition runs every model once, back to back), so their ratios see the same
machine load; each timed window dispatches ``--steps`` steps with no host-device sync inside and
waits once at its end.

    python benchmarks/train_step.py                  # base size on GPU / TPU, CPU_SIZE on CPU
    python benchmarks/train_step.py --size large --batch 16 --length 512
    python benchmarks/train_step.py --dispatch-impl dropless --remat save:moe_dispatched
    python benchmarks/train_step.py --quick          # tiny smoke run

Writes ``benchmarks/results/train_step.json`` (or ``--out``) with the device named.

Model FLOPs (counted analytically, ``model_flops``; the MFU numerator, remat recomputation not
counted): a training step is 3x the forward (forward + backward of activations and of weights).
Forward FLOPs, 2 per multiply-add, for B sequences of encoder length Le and decoder length Ld,
d model, H*D attention width, f MLP hidden, V vocab, E experts, k experts per token:

    encoder layer, per encoder token:   8 d H D (q, k, v, o) + 4 Le H D (scores and context)
    decoder layer, per decoder token:   8 d H D + 4 Ld H D (self) + 4 d H D (cross q, o)
                                        + 4 Le H D (cross scores and context)
                   per encoder token:   4 d H D (cross k, v)
    dense MLP, per token:               2 m d f  (m = 3 gated, 2 otherwise)
    MoE MLP, per token:                 k 2 m d f + 2 d E (router)
                                        + 4 d b (HyperMoE's HyperExpert, MoE-Share's adapter)
    logits, per decoder token:          2 d V
    per step (not per token):           HyperMoE generator (per stack: L_moe E times the selection
                                        MLP and the hypernetwork with its four heads),
                                        HyperRouter's router hypernetwork (per MoE layer)

Attention counts the full L x L scores (no causal discount, as PaLM's MFU). MFU = model FLOPs /
step time / the device's peak dense bf16 FLOP/s (``PEAK_BF16_FLOPS``; None on CPU or an unknown
device).

Targets: HyperMoE / Switch train step <= 1.05 and inference <= 1.03; Switch (and HyperMoE) / dense
T5 of equal active FLOPs (top-1, expert hidden = dense hidden) <= 1.3; HyperMoE train step at base
size >= 40% MFU in bf16 on one H100 / H200.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from hypermoe_jax import models
from hypermoe_jax.architectures import sizes
from hypermoe_jax.architectures.config import is_sparse, num_periods
from hypermoe_jax.architectures.encoder_decoder import EncoderDecoder
from hypermoe_jax.layers import dispatch, experts, variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig
from hypermoe_jax.training import optimizers

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "train_step.json"
MODELS = ("dense", "switch", "hypermoe", "hyperrouter", "smoe_dropout")
CPU_SIZE = "small"
TARGETS = {
    "hypermoe_over_switch_train": 1.05,
    "hypermoe_over_switch_inference": 1.03,
    "moe_over_dense_train": 1.3,
    "hypermoe_mfu_train": 0.40,
}

# Peak dense (no sparsity) bf16 FLOP/s of one JAX device, by ``device_kind`` (longest matching
# prefix wins). TPU v2 / v3 devices are single cores (half a chip).
PEAK_BF16_FLOPS: dict[str, float] = {
    "NVIDIA H200": 989.4e12,
    "NVIDIA H100 80GB HBM3": 989.4e12,  # SXM
    "NVIDIA H100 NVL": 835.5e12,
    "NVIDIA H100 PCIe": 756.0e12,
    "NVIDIA H100": 989.4e12,
    "NVIDIA GH200": 989.4e12,
    "NVIDIA A100": 312.0e12,
    "NVIDIA L4": 121.0e12,
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275.0e12,
    "TPU v5 lite": 197.0e12,
    "TPU v5e": 197.0e12,
    "TPU v5p": 459.0e12,
    "TPU v5": 459.0e12,
    "TPU v6 lite": 918.0e12,
    "TPU v6e": 918.0e12,
}


def peak_flops(device_kind: str) -> float | None:
    """The peak dense bf16 FLOP/s of a device kind (``PEAK_BF16_FLOPS``), None when unknown."""
    matches = [k for k in PEAK_BF16_FLOPS if device_kind.startswith(k)]
    return PEAK_BF16_FLOPS[max(matches, key=len)] if matches else None


@dataclasses.dataclass(frozen=True)
class Config:
    size: str = "base"
    batch: int = 32
    length: int = 512  # encoder and decoder length
    vocab_size: int = sizes.T5_VOCAB_SIZE
    num_experts: int = 8
    models: tuple[str, ...] = MODELS
    num_layers: int | None = None  # override the size's encoder / decoder layers
    dispatch_impl: str = "auto"
    remat_policy: str = "none"
    dtype: str = "bfloat16"
    steps: int = 5  # steps per timed window
    repetitions: int = 5
    warmup: int = 1
    # ``model``: the models' initialisers (one more compiled program per model); ``random``:
    # N(0, 1/fan_in) drawn on the host from the variables' shapes (norm scales 1, biases 0) --
    # the same step programs, compiled sooner (the smoke run).
    init: str = "model"


BASE = Config()
CPU = Config(size=CPU_SIZE, batch=8, length=128, steps=2, repetitions=3)
QUICK = Config(size="tiny", batch=2, length=16, vocab_size=512, num_layers=2, steps=1,
               repetitions=2, warmup=1, init="random")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def transformer_config(cfg: Config, name: str):
    """The ``TransformerConfig`` of one benchmarked model (top-1 MoE every second block, expert
    hidden = dense hidden: equal active FLOPs up to the router and the HyperExperts)."""
    overrides = dict(dtype=cfg.dtype, dropout_rate=0.0, remat_policy=cfg.remat_policy,
                     vocab_size=cfg.vocab_size, logits_via_embedding=False)
    if cfg.num_layers:
        overrides.update(num_encoder_layers=cfg.num_layers, num_decoder_layers=cfg.num_layers)
    if name == "dense":
        return sizes.t5_1_1(cfg.size, **overrides)
    moe = variants.moe_config(
        name, experts=ExpertsConfig(num_experts=cfg.num_experts),
        router=RouterConfig(num_selected=1),
        dispatch=DispatchConfig(impl=cfg.dispatch_impl))
    return sizes.sparse_t5(cfg.size, moe, tied_embeddings=False, **overrides)


def model_flops(tcfg, batch: int, enc_len: int, dec_len: int) -> dict[str, float]:
    """Forward and training FLOPs of one step (the module docstring's formula)."""
    d, hd, f, vocab = tcfg.emb_dim, tcfg.num_heads * tcfg.head_dim, tcfg.mlp_dim, tcfg.vocab_size
    mats = 3 if experts.is_gated(tcfg.activation) else 2
    moe = tcfg.moe
    n_enc, n_dec = batch * enc_len, batch * dec_len

    def mlp_flops(num_layers, step):
        sparse = num_periods(num_layers, step) if is_sparse(step) else 0
        dense = num_layers - sparse
        per_token = dense * 2 * mats * d * f
        if sparse:
            ecfg = moe.experts
            moe_tok = moe.num_selected * 2 * mats * d * ecfg.hidden_dim + 2 * d * moe.num_experts
            if moe.hyper_experts is not None:
                moe_tok += 4 * d * moe.hyper_experts.bottleneck_dim
            if moe.shared_adapter is not None:
                moe_tok += 4 * d * moe.shared_adapter.bottleneck_dim
            per_token += sparse * moe_tok
        return per_token, sparse

    enc_mlp, enc_moe = mlp_flops(tcfg.num_encoder_layers, tcfg.encoder_sparse_step)
    dec_mlp, dec_moe = mlp_flops(tcfg.num_decoder_layers, tcfg.decoder_sparse_step)
    le, ld = tcfg.num_encoder_layers, tcfg.num_decoder_layers
    fwd = n_enc * (le * (8 * d * hd + 4 * enc_len * hd) + enc_mlp)
    fwd += n_dec * (ld * (12 * d * hd + 4 * dec_len * hd + 4 * enc_len * hd) + dec_mlp)
    fwd += n_enc * ld * 4 * d * hd  # cross-attention keys and values
    fwd += n_dec * 2 * d * vocab
    per_step = 0.0
    if moe is not None and moe.hyper_experts is not None:
        h = moe.hyper_experts
        b, de, p, s, lz, hh = (h.bottleneck_dim, h.expert_embed_dim, h.selection_hidden_dim,
                               h.selection_dim, h.layer_embed_dim, h.hyper_hidden_dim)
        per_set = 2 * (de * p + p * s) + 2 * (s + lz) * hh + 2 * hh * (2 * d * b + b + d)
        per_step += (enc_moe + dec_moe) * moe.num_experts * per_set
    if moe is not None and moe.router.router_kind == "hyper":
        r, hh = d, moe.router.hyper_hidden_dim
        per_step += (enc_moe + dec_moe) * 2 * (r * hh + hh * moe.num_experts * (d + 1))
    fwd += per_step
    return {"forward": float(fwd), "train": float(3 * fwd)}


def make_batch(cfg: Config) -> dict[str, jax.Array]:
    rng = np.random.default_rng(0)
    shape = (cfg.batch, cfg.length)

    def tokens():
        return jnp.asarray(rng.integers(2, cfg.vocab_size, shape), jnp.int32)

    return {"encoder_input_tokens": tokens(), "decoder_input_tokens": tokens(),
            "decoder_target_tokens": tokens()}


def build(cfg: Config, name: str, batch: dict[str, jax.Array]) -> dict:
    """Initial state, and the AOT-compiled train step and forward of one model, with their
    compile times and compiled memory."""
    tcfg = transformer_config(cfg, name)
    model = models.EncoderDecoderModel(EncoderDecoder(tcfg))
    shapes = {k: v.shape for k, v in batch.items()}
    boxed = jax.eval_shape(lambda r: model.get_initial_variables(r, shapes), jax.random.key(0))
    optimizer = optimizers.make_optimizer("adafactor", learning_rate=1e-3)
    tx = optimizer.transform(optimizers.logical_param_axes(boxed))
    if cfg.init == "random":
        variables = _host_random(nn.unbox(boxed))
    else:
        variables = jax.jit(lambda r: nn.unbox(model.get_initial_variables(r, shapes)))(
            jax.random.key(0))
    params = variables.pop("params")
    mutables = variables  # e.g. the frozen routers of HyperRouter / SMoE-Dropout
    state = {"params": params, "opt_state": jax.jit(tx.init)(params),
             "rng": jax.random.key(1), "step": jnp.zeros((), jnp.int32)}

    def train_step(state, mutables, batch):
        rng, step_rng = jax.random.split(state["rng"])
        (loss, _), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
            state["params"], batch, step_rng, flax_mutables=mutables, step=state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = jax.tree.map(jnp.add, state["params"], updates)
        return {"params": params, "opt_state": opt_state, "rng": rng,
                "step": state["step"] + 1}, loss

    def forward(params, mutables, batch):
        args, kwargs = model._module_inputs(batch)
        logits, _ = model._apply(params, mutables, *args, **kwargs, enable_dropout=False)
        return logits

    start = time.perf_counter()
    train = jax.jit(train_step, donate_argnums=0).lower(state, mutables, batch).compile()
    train_compile = time.perf_counter() - start
    start = time.perf_counter()
    infer = jax.jit(forward).lower(params, mutables, batch).compile()
    infer_compile = time.perf_counter() - start
    n_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    return {"config": tcfg, "state": state, "mutables": mutables, "train": train, "infer": infer,
            "compile_s": {"train": train_compile, "inference": infer_compile},
            "memory": {"train": _compiled_memory(train), "inference": _compiled_memory(infer)},
            "params": n_params}


def _host_random(abstract, seed: int = 0):
    """N(0, 1/fan_in) values (fan_in: the second-last dim) for the variables' shapes, drawn on
    the host; norm scales 1 and biases 0."""
    rng = np.random.default_rng(seed)

    def value(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = leaf.shape[-2] ** -0.5 if len(leaf.shape) >= 2 else 1.0
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(value, abstract)


def _compiled_memory(compiled) -> dict | None:
    """Bytes of the compiled program's buffers (``memory_analysis``), where the backend has it."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes")
    out = {k: int(getattr(m, k)) for k in fields if hasattr(m, k)}
    if len(out) == len(fields):
        out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                              - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
    return out


def _device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def run(cfg: Config) -> dict:
    batch = make_batch(cfg)
    built = {}
    for name in cfg.models:
        built[name] = build(cfg, name, batch)
        b = built[name]
        for _ in range(cfg.warmup):  # also the first run of each program
            b["state"], loss = b["train"](b["state"], b["mutables"], batch)
            jax.block_until_ready(b["infer"](b["state"]["params"], b["mutables"], batch))
        b["first_loss"] = float(loss)
        b["device_peak_bytes"] = _device_peak_bytes()
        print(f"{name:12s} compiled: train {b['compile_s']['train']:.1f} s, inference "
              f"{b['compile_s']['inference']:.1f} s; loss {b['first_loss']:.3f}", flush=True)

    times = {m: {"train": [], "inference": []} for m in cfg.models}
    for _ in range(cfg.repetitions):
        for name in cfg.models:  # interleaved: every model once per repetition
            b = built[name]
            state = b["state"]
            start = time.perf_counter()
            for _ in range(cfg.steps):  # no host-device sync inside the window
                state, loss = b["train"](state, b["mutables"], batch)
            jax.block_until_ready((state, loss))
            times[name]["train"].append((time.perf_counter() - start) * 1e3 / cfg.steps)
            b["state"], b["last_loss"] = state, loss
        for name in cfg.models:
            b = built[name]
            start = time.perf_counter()
            for _ in range(cfg.steps):
                out = b["infer"](b["state"]["params"], b["mutables"], batch)
            jax.block_until_ready(out)
            times[name]["inference"].append((time.perf_counter() - start) * 1e3 / cfg.steps)
    return {"built": built, "times": times}


def _paired(a: list[float], b: list[float]) -> dict[str, float]:
    return {"ratio": round(statistics.median(x / y for x, y in zip(a, b)), 4),
            "ratio_of_medians": round(statistics.median(a) / statistics.median(b), 4),
            "ratio_min": round(min(a) / min(b), 4)}


def summarize(cfg: Config, measured: dict) -> dict:
    dev = jax.devices()[0]
    peak = peak_flops(dev.device_kind)
    tokens = cfg.batch * cfg.length * 2  # encoder + decoder tokens per step
    rows = {}
    for name in cfg.models:
        b, t = measured["built"][name], measured["times"][name]
        flops = model_flops(b["config"], cfg.batch, cfg.length, cfg.length)
        row = {"params": b["params"], "model_flops_per_step": flops,
               "compile_s": {k: round(v, 2) for k, v in b["compile_s"].items()},
               "compiled_memory_bytes": b["memory"],
               "device_peak_bytes_in_use": b["device_peak_bytes"],
               "loss_first_last": [round(b["first_loss"], 4), round(float(b["last_loss"]), 4)]}
        for mode, key in (("train", "train"), ("inference", "forward")):
            ms = statistics.median(t[mode])
            achieved = flops[key] / (ms / 1e3)
            row[mode] = {
                "step_ms": round(ms, 3), "step_ms_all": [round(v, 3) for v in t[mode]],
                "tokens_per_s": round(tokens / (ms / 1e3), 1),
                "model_tflops_per_s": round(achieved / 1e12, 4),
                "mfu": None if peak is None else round(achieved / peak, 4),
            }
        rows[name] = row
    ratios = {}
    pairs = [("hypermoe", "switch"), ("switch", "dense"), ("hypermoe", "dense"),
             ("hyperrouter", "switch"), ("smoe_dropout", "switch"), ("hyperrouter", "dense"),
             ("smoe_dropout", "dense")]
    for a, b in pairs:
        if a in rows and b in rows:
            for mode in ("train", "inference"):
                ta, tb = measured["times"][a][mode], measured["times"][b][mode]
                ratios[f"{a}_over_{b}_{mode}"] = _paired(ta, tb)
    targets = {}

    def judge(key, value, limit, below=True):
        targets[key] = {"value": value, "limit": limit,
                        "met": None if value is None else (value <= limit if below
                                                           else value >= limit)}

    for mode in ("train", "inference"):
        r = ratios.get(f"hypermoe_over_switch_{mode}")
        judge(f"hypermoe_over_switch_{mode}", r and r["ratio"],
              TARGETS[f"hypermoe_over_switch_{mode}"])
    moe_dense = [ratios[k]["ratio"] for k in ("switch_over_dense_train",
                                              "hypermoe_over_dense_train") if k in ratios]
    judge("moe_over_dense_train", max(moe_dense) if moe_dense else None,
          TARGETS["moe_over_dense_train"])
    mfu = rows.get("hypermoe", {}).get("train", {}).get("mfu")
    judge("hypermoe_mfu_train", mfu, TARGETS["hypermoe_mfu_train"], below=False)
    targets["hypermoe_mfu_train"]["applies"] = cfg.size == "base" and peak is not None
    return {"models": rows, "ratios": ratios, "targets": targets, "peak_flops": peak}


def _device_info() -> dict:
    dev = jax.devices()[0]
    return {"platform": dev.platform, "device_kind": dev.device_kind,
            "num_devices": jax.device_count(), "devices_used": 1,
            "host_cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "peak_bf16_flops": peak_flops(dev.device_kind)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--size", choices=sorted(k for k in sizes.SIZES
                                                 if not k.startswith("lm_")))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--length", type=int, help="encoder and decoder length")
    parser.add_argument("--models", nargs="+", choices=MODELS)
    parser.add_argument("--dispatch-impl", choices=("auto", *dispatch.DISPATCH_IMPLS,
                                                    dispatch.DROPLESS))
    parser.add_argument("--remat", dest="remat_policy",
                        help="TransformerConfig.remat_policy, e.g. full or save:moe_dispatched")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--steps", type=int, help="steps per timed window")
    parser.add_argument("--repetitions", type=int)
    args = parser.parse_args(argv)
    if args.quick:
        cfg = QUICK
    else:
        cfg = CPU if jax.default_backend() == "cpu" else BASE
    overrides = {k: getattr(args, k) for k in ("size", "batch", "length", "dispatch_impl",
                                                "remat_policy", "dtype", "steps", "repetitions")}
    overrides["models"] = args.models and tuple(args.models)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    measured = run(cfg)
    summary = summarize(cfg, measured)
    result = {
        "benchmark": "train_step",
        "description": (
            "Full jitted training step (forward, backward, Adafactor update) and teacher-forced "
            "inference forward of encoder-decoders at T5 v1.1 dims, float32 parameters, "
            f"{cfg.dtype} activations, float32 router, one device. Median ms per step over "
            "interleaved repetitions (each a window of `steps` steps dispatched without a "
            "host sync). Ratios: median of the per-repetition ratio (the two models ran back to "
            "back), with the ratio of medians and of minima beside it. MFU: analytic model "
            "FLOPs (train = 3 x forward) / step time / peak_flops (None where unknown)."),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "device": _device_info(),
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__,
                     "flax": flax.__version__},
        "config": {**dataclasses.asdict(cfg), "tokens_per_step": 2 * cfg.batch * cfg.length,
                   "num_selected": 1, "sparse_step": 2, "optimizer": "adafactor",
                   "dispatch_impl_resolved": _resolved_impl(cfg.dispatch_impl)},
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, t in result["targets"].items():
        print(f"{key}: {t['value']} (limit {t['limit']}, met {t['met']})")
    print(f"wrote {args.out}")
    return result


def _resolved_impl(impl: str) -> str:
    from hypermoe_jax.layers import backend
    return impl if impl == dispatch.DROPLESS else backend.resolve("dispatch", impl)


if __name__ == "__main__":
    main()
