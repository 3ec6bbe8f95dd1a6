"""Speed: the HyperMoE layer against the Switch layer, and the efficient HyperExpert against the
literal per-token form of the official code.

1. Layer: ``SparseMlp(variant="hypermoe")`` (dense placement, exact; the generator call for the
   layer included) against ``SparseMlp(variant="switch")`` with the same MoE settings and weights:
   a train step (gradient of ``sum(y * cot)`` w.r.t. all parameters) and the forward pass alone.
   The fused placement is timed too.
2. HyperExpert alone: generation + application for the layer's tokens, efficient
   (``HyperExpertGenerator`` + ``apply_hyper_experts``: N adapters, tokens grouped by adapter)
   against the literal form (hypernetwork run per token, per-token weights ``[T, d, b]``
   materialised and applied), forward and train step; the two are checked to agree.
3. The dense placement's grouped-matmul options (``grouped.GROUPED_IMPLS``) on the same adapters.

Every measurement set is timed interleaved (one timed call of each function per repetition, each
after an untimed call of the same function; the order rotates): the forward passes form one set,
the train steps another, so each repetition times HyperMoE and Switch within seconds of each
other. The layer targets use the median over repetitions of the per-repetition ratio (the two
calls of a repetition see the same machine load, which on a shared machine drifts by more than
the few percent measured); the ratio of the medians and of the fastest calls are reported beside
it.

    python benchmarks/hyper_layer.py          # d=768, f=3072, b=64, E in {8, 64}, 8192 tokens
    python benchmarks/hyper_layer.py --quick  # a tiny smoke configuration (seconds)

Writes ``benchmarks/results/hyper_layer.json`` (or ``--out``).
Targets: HyperMoE / Switch <= 1.10 (train step) and <= 1.05 (forward); efficient HyperExpert
>= 10x faster than the literal per-token one.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
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
import optax
from flax import linen as nn

from hypermoe_jax.layers import backend, hyper_experts, variants
from hypermoe_jax.layers import grouped as grouped_lib
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "hyper_layer.json"
TARGETS = {
    "hypermoe_over_switch_train_step": ("<=", 1.10),
    "hypermoe_over_switch_forward": ("<=", 1.05),
    "hyper_expert_speedup_forward": (">=", 10.0),
    "hyper_expert_speedup_train_step": (">=", 10.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
    d_model: int = 768
    hidden_dim: int = 3072
    bottleneck_dim: int = 64
    num_experts: tuple[int, ...] = (8, 64)
    num_tokens: int = 8192
    seq_len: int = 512
    group_size: int = 512
    train_capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    dispatch_impl: str = "auto"  # by backend (layers/backend.py)
    grouped_impl: str = "auto"
    compare_grouped_impls: bool = True
    time_fused: bool = True
    repetitions: int = 15  # layer timings (a few % apart: many repetitions)
    hyper_expert_repetitions: int = 3  # efficient vs literal (an order of magnitude apart)
    warmup: int = 1
    rewarm: bool = True  # an untimed call of the same function before each timed one


FULL = Config()
QUICK = Config(
    d_model=32,
    hidden_dim=64,
    bottleneck_dim=8,
    num_experts=(4,),
    num_tokens=256,
    seq_len=64,
    group_size=64,
    compare_grouped_impls=False,
    time_fused=False,
    repetitions=2,
    hyper_expert_repetitions=2,
)


# --------------------------------------------------------------------------------------------
# The literal per-token HyperExpert (as the official PyTorch code computes it)
# --------------------------------------------------------------------------------------------


def literal_hyper_expert(gen_params, layer: int, x, expert_index, num_experts: int):
    """Per token: sum of its unselected expert embeddings -> selection MLP -> [s; layer emb] ->
    hypernetwork -> flat head outputs viewed as per-token weights ``[T, d, b]`` -> applied."""
    num_tokens, d = x.shape
    hn = gen_params["hypernet"]
    hidden, b = hn["b_down_kernel"].shape
    unselected = 1.0 - jnp.sum(jax.nn.one_hot(expert_index, num_experts), axis=-2)  # [T, N]
    s = unselected @ gen_params["expert_embedding"][layer]
    s = jax.nn.relu(s @ gen_params["selection_w1"][layer] + gen_params["selection_b1"][layer])
    s = s @ gen_params["selection_w2"][layer] + gen_params["selection_b2"][layer]
    lemb = gen_params["layer_embedding"][layer]
    z = jnp.concatenate([s, jnp.broadcast_to(lemb, (num_tokens, lemb.shape[-1]))], axis=-1)
    h = jax.nn.relu(z @ hn["hidden_kernel"] + hn["hidden_bias"])
    w_down = (h @ hn["w_down_kernel"].reshape(hidden, d * b)
              + hn["w_down_bias"].reshape(-1)).reshape(num_tokens, d, b)
    w_up = (h @ hn["w_up_kernel"].reshape(hidden, b * d)
            + hn["w_up_bias"].reshape(-1)).reshape(num_tokens, b, d)
    b_down = h @ hn["b_down_kernel"] + hn["b_down_bias"]
    b_up = h @ hn["b_up_kernel"] + hn["b_up_bias"]
    r = jax.nn.relu(jnp.einsum("td,tdb->tb", x, w_down) + b_down)
    return jnp.einsum("tb,tbd->td", r, w_up) + b_up


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _time_interleaved(
    fns: dict, repetitions: int, warmup: int, rewarm: bool = True
) -> dict[str, list[float]]:
    """Per repetition, one timed call of each function (the order rotates between repetitions).

    With ``rewarm`` each timed call follows an untimed call of the same function: a function is
    not charged for the memory state the previous, different function left behind (on CPU, a call
    right after the literal HyperExpert's multi-GB temporaries pays ~0.4 s of fresh page faults,
    5x the efficient form's own time), only for its own steady-state cost, as in a training loop.
    """
    for fn in fns.values():
        for _ in range(max(1, warmup)):  # the first call compiles
            jax.block_until_ready(fn())
    names = list(fns)
    times = {name: [] for name in names}
    for rep in range(repetitions):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            if rewarm:
                jax.block_until_ready(fns[name]())
            start = time.perf_counter()
            jax.block_until_ready(fns[name]())
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def _median(ts: list[float]) -> float:
    return round(statistics.median(ts), 3)


def _train_step(fn):
    """jit of grad w.r.t. the first argument of ``sum(fn(params, x) * cot)``."""

    def loss(params, x, cot):
        return jnp.sum(fn(params, x) * cot)

    return jax.jit(jax.grad(loss))


def _ungated_train_step(fn):
    """jit of grad w.r.t. (params, x) of ``sum(fn(params, x, ids) * cot)``."""

    def loss(params, x, ids, cot):
        return jnp.sum(fn(params, x, ids) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def run_one(cfg: Config, num_experts: int) -> dict:
    batch = cfg.num_tokens // cfg.seq_len
    d, f, b = cfg.d_model, cfg.hidden_dim, cfg.bottleneck_dim
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, cfg.seq_len, d))
    cot = jax.random.normal(jax.random.fold_in(key, 2), x.shape) * d**-0.5

    common = dict(
        experts=ExpertsConfig(num_experts=num_experts, hidden_dim=f),
        dispatch=DispatchConfig(train_capacity_factor=cfg.train_capacity_factor,
                                eval_capacity_factor=cfg.eval_capacity_factor,
                                group_size=cfg.group_size, impl=cfg.dispatch_impl),
    )
    hcfg = HyperExpertsConfig(bottleneck_dim=b, grouped_impl=cfg.grouped_impl)
    switch = variants.SparseMlp(variants.moe_config("switch", **common))
    dense = variants.SparseMlp(variants.moe_config("hypermoe", hyper_experts=hcfg, **common))
    fused = variants.SparseMlp(variants.moe_config(
        "hypermoe", hyper_experts=dataclasses.replace(hcfg, placement="fused"), **common))
    gen = hyper_experts.HyperExpertGenerator(num_layers=1, num_experts=num_experts,
                                             num_selected=1, d_model=d, config=hcfg)
    switch_params = nn.unbox(jax.jit(switch.init)(jax.random.fold_in(key, 3), x)["params"])
    gen_params = nn.unbox(jax.jit(gen.init)(jax.random.fold_in(key, 4))["params"])
    # Give the HyperExperts O(1) weights (at init the hyperfanin heads make them ~1e-3; the
    # timing does not depend on it, the agreement check below does).
    gen_params["hypernet"] = {
        k: v * 1e3 if k.endswith("_kernel") and k != "hidden_kernel" else v
        for k, v in gen_params["hypernet"].items()
    }
    hyper_params = {"generator": gen_params, "layer": switch_params}  # same MoE weights

    def switch_fwd(params, x, deterministic=True):
        return switch.apply({"params": params}, x, deterministic=deterministic)[0]

    def hyper_fwd(layer, params, x, deterministic=True):
        hi = jax.tree.map(lambda a: a[0], gen.apply({"params": params["generator"]}))
        return layer.apply({"params": params["layer"]}, x, deterministic=deterministic,
                           hyper_inputs=hi)[0]

    def train(fwd):
        return _train_step(lambda p, x: fwd(p, x, deterministic=False))

    layer_fns = {
        "switch_forward": functools.partial(jax.jit(switch_fwd), switch_params, x),
        "hypermoe_forward": functools.partial(
            jax.jit(functools.partial(hyper_fwd, dense)), hyper_params, x),
        "switch_train_step": functools.partial(train(switch_fwd), switch_params, x, cot),
        "hypermoe_train_step": functools.partial(
            train(functools.partial(hyper_fwd, dense)), hyper_params, x, cot),
    }
    if cfg.time_fused:
        layer_fns["hypermoe_fused_forward"] = functools.partial(
            jax.jit(functools.partial(hyper_fwd, fused)), hyper_params, x)
        layer_fns["hypermoe_fused_train_step"] = functools.partial(
            train(functools.partial(hyper_fwd, fused)), hyper_params, x, cot)
    layer_times = {}
    for kind in ("forward", "train_step"):
        print(f"E={num_experts}: layer {kind} ...", flush=True)
        fns = {k: v for k, v in layer_fns.items() if k.endswith(kind)}
        layer_times.update(_time_interleaved(fns, cfg.repetitions, cfg.warmup, cfg.rewarm))

    # HyperExpert alone, on the layer's own top-1 choices.
    _, aux = jax.jit(switch.apply)({"params": switch_params}, x)
    xt = x.reshape(-1, d)
    expert_index = aux.expert_index.reshape(-1, 1)
    ct = cot.reshape(-1, d)

    def efficient(params, xt, idx):
        hi = jax.tree.map(lambda a: a[0], gen.apply({"params": params}))
        return hyper_experts.apply_hyper_experts(hi, xt, idx, num_experts=num_experts,
                                                 impl=cfg.grouped_impl)

    def literal(params, xt, idx):
        return literal_hyper_expert(params, 0, xt, idx, num_experts)

    efficient_fwd, literal_fwd = jax.jit(efficient), jax.jit(literal)
    y_eff = efficient_fwd(gen_params, xt, expert_index)
    y_lit = literal_fwd(gen_params, xt, expert_index)
    max_abs_diff = float(jnp.max(jnp.abs(y_eff - y_lit)))
    rms = float(jnp.sqrt(jnp.mean(y_lit**2)))
    del y_eff, y_lit
    he_fns = {
        "hyper_expert_efficient_forward": functools.partial(
            efficient_fwd, gen_params, xt, expert_index),
        "hyper_expert_literal_forward": functools.partial(
            literal_fwd, gen_params, xt, expert_index),
        "hyper_expert_efficient_train_step": functools.partial(
            _ungated_train_step(efficient), gen_params, xt, expert_index, ct),
        "hyper_expert_literal_train_step": functools.partial(
            _ungated_train_step(literal), gen_params, xt, expert_index, ct),
    }
    print(f"E={num_experts}: HyperExpert ...", flush=True)
    he_times = _time_interleaved(he_fns, cfg.hyper_expert_repetitions, cfg.warmup, cfg.rewarm)

    grouped = None
    if cfg.compare_grouped_impls:
        adapters = jax.jit(lambda p: jax.tree.map(lambda a: a[0], gen.apply({"params": p})))(
            gen_params)
        ids = expert_index[:, 0]
        grouped_fns = {}
        for impl in grouped_lib.GROUPED_IMPLS:
            def apply(a, xt, ids, impl=impl):
                return grouped_lib.grouped_adapter_mlp(a, xt, ids, impl=impl)

            grouped_fns[f"{impl}_forward"] = functools.partial(jax.jit(apply), adapters, xt, ids)
            grouped_fns[f"{impl}_train_step"] = functools.partial(
                _ungated_train_step(apply), adapters, xt, ids, ct)
        print(f"E={num_experts}: grouped impls ...", flush=True)
        g_times = _time_interleaved(grouped_fns, cfg.hyper_expert_repetitions, cfg.warmup,
                                   cfg.rewarm)
        grouped = {
            "ms": {k: _median(v) for k, v in g_times.items()},
            "ms_all": {k: [round(t, 3) for t in v] for k, v in g_times.items()},
        }

    times = {**layer_times, **he_times}
    ms = {k: _median(v) for k, v in times.items()}

    layer_pairs = {
        "hypermoe_over_switch_train_step": ("hypermoe_train_step", "switch_train_step"),
        "hypermoe_over_switch_forward": ("hypermoe_forward", "switch_forward"),
    }
    if cfg.time_fused:
        layer_pairs["hypermoe_fused_over_switch_train_step"] = (
            "hypermoe_fused_train_step", "switch_train_step")
        layer_pairs["hypermoe_fused_over_switch_forward"] = (
            "hypermoe_fused_forward", "switch_forward")
    ratios = {  # layers: median over repetitions of the per-repetition ratio
        name: statistics.median(a / b for a, b in zip(times[num], times[den]))
        for name, (num, den) in layer_pairs.items()
    }
    ratios["hyper_expert_speedup_forward"] = (
        ms["hyper_expert_literal_forward"] / ms["hyper_expert_efficient_forward"])
    ratios["hyper_expert_speedup_train_step"] = (
        ms["hyper_expert_literal_train_step"] / ms["hyper_expert_efficient_train_step"])
    ratios = {k: round(v, 4) for k, v in ratios.items()}
    # For comparison with the paired layer ratios: the ratio of the medians, and of the fastest
    # calls, of the same timings.
    other_estimates = {
        "ratio_of_medians": {
            name: round(ms[num] / ms[den], 4) for name, (num, den) in layer_pairs.items()},
        "ratio_of_minima": {
            name: round(min(times[num]) / min(times[den]), 4)
            for name, (num, den) in layer_pairs.items()},
    }
    targets = {}
    for name, (op, bound) in TARGETS.items():
        met = ratios[name] <= bound if op == "<=" else ratios[name] >= bound
        targets[name] = {"value": ratios[name], "target": f"{op} {bound}", "met": bool(met)}
    row = {
        "num_experts": num_experts,
        "ms": ms,
        "ratios": ratios,
        "layer_ratio_other_estimates": other_estimates,
        "targets": targets,
        "hyper_expert_check": {
            "max_abs_diff_efficient_vs_literal": max_abs_diff,
            "rms_literal_output": rms,
        },
        "ms_all": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }
    if grouped is not None:
        row["grouped_impls"] = grouped
    summary = "  ".join(f"{k}={v}" for k, v in ratios.items())
    print(f"E={num_experts}: {summary}", flush=True)
    return row


def _device_info() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "num_devices_used": 1,
        "host_cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--repetitions", type=int, default=None)
    parser.add_argument("--dispatch-impl", default=None,
                        help="DispatchConfig.impl (default: auto, by backend)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    overrides = {"repetitions": args.repetitions, "dispatch_impl": args.dispatch_impl}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    rows = [run_one(cfg, e) for e in cfg.num_experts]
    result = {
        "benchmark": "hyper_layer",
        "description": (
            "HyperMoE layer (dense placement, generator call included) vs Switch layer with the "
            "same MoE weights: train step = grad of sum(y * cot) w.r.t. all parameters (train "
            "capacity factor), forward = eval forward (eval capacity factor). Layer ratios: "
            "median over repetitions of the per-repetition ratio (forward passes and train steps "
            "timed as two interleaved sets); ratios of medians and of minima beside them. "
            "HyperExpert alone: "
            "efficient (N generated adapters, tokens grouped by adapter) vs literal per-token "
            "(per-token weights [T, d, b] as the official code), grad w.r.t. generator params "
            "and x for the train step. Median wall-clock ms over interleaved repetitions (each "
            "timed call preceded by an untimed call of the same function)."
        ),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "device": _device_info(),
        "versions": {
            "python": platform.python_version(),
            "jax": jax.__version__,
            "jaxlib": jax.lib.__version__,
            "flax": flax.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
        },
        "config": {
            **dataclasses.asdict(cfg),
            "num_selected": 1,
            "activation": "relu",
            "resolved": {"dispatch": backend.resolve("dispatch", cfg.dispatch_impl),
                         "grouped_matmul": backend.resolve("grouped_matmul", cfg.grouped_impl)},
            "dtype": "float32",
            "hyper": {
                "expert_embed_dim": 128, "selection_dims": [128, 128], "layer_embed_dim": 10,
                "hyper_hidden_dim": 128, "placement_timed": "dense (and fused)",
            },
        },
        "targets": {name: f"{op} {bound}" for name, (op, bound) in TARGETS.items()},
        "targets_met": all(t["met"] for r in rows for t in r["targets"].values()),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; all targets met: {result['targets_met']}")
    return result


if __name__ == "__main__":
    main()
