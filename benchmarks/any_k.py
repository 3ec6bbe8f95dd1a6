"""Any-k inference costs what k costs: an SMoE-Dropout layer evaluated with k of E experts.

    python benchmarks/any_k.py           # E = 16, k in {1, 2, 4, 8, 16}, d=256, f=1024, 4096 tokens
    python benchmarks/any_k.py --quick   # a tiny smoke configuration (seconds)

For each k the eval forward of one ``SparseMlp(moe_config("smoe_dropout"))`` layer with
``num_selected = E`` is timed two ways, interleaved in one run:

* ``static``: ``active_k=k`` as a Python int -- top-k and capacity are sized for k (one compiled
  program per k), what evaluation and decoding use;
* ``traced``: ``active_k`` a traced array -- ranks >= k are masked but capacity stays sized for
  ``num_selected`` (one program for every k), what a growing-k training step uses.

Target: the static forward at k = 1 costs at most 0.35x the one at k = E (the expert work falls
with k; routing and the token reshuffles do not). Writes ``benchmarks/results/any_k.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn

from hypermoe_jax.layers import variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "any_k.json"
TARGET = 0.35  # static forward time at k = 1 over k = E


@dataclasses.dataclass(frozen=True)
class Config:
    d_model: int = 256
    hidden_dim: int = 1024
    num_experts: int = 16
    k_values: tuple[int, ...] = (1, 2, 4, 8, 16)
    num_tokens: int = 4096
    group_size: int = 512
    eval_capacity_factor: float = 2.0
    repetitions: int = 5
    warmup: int = 1


FULL = Config()
QUICK = Config(d_model=32, hidden_dim=64, num_experts=4, k_values=(1, 4), num_tokens=256,
               group_size=64, repetitions=2)


def _layer(cfg: Config) -> variants.SparseMlp:
    return variants.SparseMlp(variants.moe_config(
        "smoe_dropout",
        experts=ExpertsConfig(num_experts=cfg.num_experts, hidden_dim=cfg.hidden_dim,
                              activation="relu"),
        router=RouterConfig(num_selected=cfg.num_experts),
        dispatch=DispatchConfig(eval_capacity_factor=cfg.eval_capacity_factor,
                                group_size=cfg.group_size),
    ))


def _time(fns: dict, repetitions: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds of each function over interleaved repetitions."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repetitions):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def run(cfg: Config) -> dict:
    layer = _layer(cfg)
    x = jax.random.normal(jax.random.key(0), (cfg.num_tokens // cfg.group_size, cfg.group_size,
                                              cfg.d_model))
    variables = nn.unbox(jax.jit(layer.init)(jax.random.key(1), x))
    static = {k: jax.jit(lambda v, x, k=k: layer.apply(v, x, active_k=k)[0])
              for k in cfg.k_values}
    traced = jax.jit(lambda v, x, k: layer.apply(v, x, active_k=k)[0])
    fns = {}
    for k in cfg.k_values:
        fns[f"static_k{k}"] = lambda k=k: static[k](variables, x)
        fns[f"traced_k{k}"] = lambda k=k: traced(variables, x, jnp.int32(k))
    times = _time(fns, cfg.repetitions, cfg.warmup)
    ms = {name: statistics.median(v) for name, v in times.items()}
    k_max = max(cfg.k_values)
    rows = [{
        "k": k,
        "static_ms": ms[f"static_k{k}"],
        "traced_ms": ms[f"traced_k{k}"],
        "static_over_static_kmax": ms[f"static_k{k}"] / ms[f"static_k{k_max}"],
        "traced_over_traced_kmax": ms[f"traced_k{k}"] / ms[f"traced_k{k_max}"],
        "static_ms_all": times[f"static_k{k}"],
        "traced_ms_all": times[f"traced_k{k}"],
    } for k in cfg.k_values]
    for r in rows:
        print(f"k={r['k']:<3d} static {r['static_ms']:8.1f} ms ({r['static_over_static_kmax']:.2f}"
              f" of k={k_max})  traced {r['traced_ms']:8.1f} ms "
              f"({r['traced_over_traced_kmax']:.2f})")
    ratio = rows[0]["static_over_static_kmax"]
    return {"rows": rows, "target": {"k": min(cfg.k_values), "max_ratio": TARGET,
                                     "ratio": ratio, "met": ratio <= TARGET}}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    measured = run(cfg)
    result = {
        "benchmark": "any_k",
        "description": (
            "Eval forward of one SMoE-Dropout layer (num_selected = E) with k experts per token: "
            "static k (top-k and capacity sized for k) vs traced k (ranks >= k masked, capacity "
            "for E). Median wall-clock ms over interleaved repetitions; ratios to k = E."),
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": bool(args.quick),
        "device": {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                   "num_devices": jax.device_count(),
                   "processor": platform.processor() or platform.machine()},
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "flax": flax.__version__},
        "config": dataclasses.asdict(cfg),
        "target": measured["target"],
        "results": measured["rows"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}; target met: {result['target']['met']}")
    return result


if __name__ == "__main__":
    main()
