"""The same model, task and steps under upstream ``t5x.train`` and under this project's trainer.

    python benchmarks/t5x_trainer.py            # hypermoe_lm_tiny, wiki_char_lm, 128 tokens x 16
    python benchmarks/t5x_trainer.py --quick    # a smoke configuration (a few minutes)

Both trainers run as the user runs them (a subprocess each, its own gin files: ``t5x/<model>.gin``
+ ``t5x/runs/pretrain.gin`` for T5X; ``models/<model>.gin`` + ``runs/pretrain.gin`` here), with no
evaluation and one checkpoint at the end. Each trainer runs ``repeats`` times at ``short_steps``
(2: start-up, initialisation, compilation, checkpoint and exit, with almost no training) and at
``steps``, every run interleaved with the others (the order rotates each round), so that from the
medians of the wall times

* ``fixed_seconds`` = median wall of the short runs -- what a run costs besides its steps;
* steady ``steps_per_second`` = ``(steps - short_steps) / (median wall(steps) - median
  wall(short))`` -- after compilation, measured the same way for both from outside;

and what each trainer reports itself (T5X: ``timing/compilation_seconds`` and the last epoch's
``timing/steps_per_second``; here: the last logged ``steps_per_second``). The trainers:

* ``t5x``: ``t5x.train`` (it has no persistent compilation cache);
* ``ours``: ``hypermoe_jax.train`` as it is, with its compilation cache off
  (``HYPERMOE_COMPILATION_CACHE=0``): the fair comparison, everything compiled in the run;
* ``ours_no_autotune``: the same with tf.data autotuning off (``pipeline_options.autotune =
  False``: no wait for the autotuner when an iterator is deleted);
* ``ours_warm_cache``: with a compilation cache that one untimed run filled first -- a rerun.

Target: this trainer is not slower than T5X (wall ratios <= 1, steady steps/s ratio >= 1). Each
trainer's ``relative_spread`` ((max - min) / median of its walls at a step count) says how far
apart its repeats fell: a ratio's distance from 1 smaller than that is noise. Needs T5X installed
and the ``wiki`` dataset (``python -m hypermoe_jax.data fetch wiki``, done here when missing).
Writes ``benchmarks/results/t5x_trainer.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "t5x_trainer.json"


@dataclasses.dataclass(frozen=True)
class Config:
    model: str = "hypermoe_lm_tiny"
    task: str = "wiki_char_lm"
    length: int = 128
    batch_size: int = 16
    steps: int = 100
    short_steps: int = 2
    repeats: int = 3


FULL = Config()
QUICK = Config(length=32, batch_size=8, steps=6, repeats=1)
TRAINERS = ("t5x", "ours", "ours_no_autotune", "ours_warm_cache")


def _common(cfg: Config, model_dir: Path, steps: int) -> dict:
    return {"MODEL_DIR": f"'{model_dir}'", "MIXTURE_OR_TASK_NAME": f"'{cfg.task}'",
            "TASK_FEATURE_LENGTHS": f"{{'targets': {cfg.length}}}", "TRAIN_STEPS": steps,
            "BATCH_SIZE": cfg.batch_size}


def t5x_argv(cfg: Config, model_dir: Path, steps: int) -> list[str]:
    macros = {**_common(cfg, model_dir, steps), "RANDOM_SEED": 0,
              "train.train_eval_dataset_cfg": None,
              # Two "epochs": the second one's steps/s is after compilation and warm-up.
              "train.gc_period": steps // 2 if steps % 2 == 0 else steps,
              "utils.SaveCheckpointConfig.period": steps}
    return [sys.executable, "-m", "t5x.train", f"--gin_search_paths={REPO / 'gin'}",
            f"--gin_file=t5x/{cfg.model}.gin", "--gin_file=t5x/runs/pretrain.gin",
            *[f"--gin.{k}={v}" for k, v in macros.items()]]


def ours_argv(cfg: Config, model_dir: Path, steps: int, autotune: bool = True) -> list[str]:
    macros = {**_common(cfg, model_dir, steps), "RANDOM_SEED": 0, "EVAL_PERIOD": steps,
              "CHECKPOINT_PERIOD": steps, "LOG_EVERY": max(steps // 2, 1)}
    if not autotune:
        macros["hypermoe_jax.training.datasets.pipeline_options.autotune"] = False
    return [sys.executable, "-m", "hypermoe_jax.train", f"--gin_file=models/{cfg.model}.gin",
            "--gin_file=runs/pretrain.gin", *[f"--gin.{k}={v}" for k, v in macros.items()],
            "--gin.hypermoe_jax.training.train.train.train_eval_dataset_cfg=None"]


def trainer_argv(name: str, cfg: Config, model_dir: Path, steps: int) -> list[str]:
    if name == "t5x":
        return t5x_argv(cfg, model_dir, steps)
    return ours_argv(cfg, model_dir, steps, autotune=name != "ours_no_autotune")


def trainer_env(name: str, cache_dir: Path) -> dict[str, str]:
    """The environment of a trainer's runs: no persistent compilation cache but the warm one's."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", ""), TF_CPP_MIN_LOG_LEVEL="3",
               HYPERMOE_COMPILATION_CACHE=str(cache_dir) if name == "ours_warm_cache" else "0")
    return env


def run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv[:3])} failed (rc {proc.returncode}):\n{log[-4000:]}")
    return wall, log


def t5x_reported(log: str) -> dict:
    compile_s = re.findall(r"timing/compilation_seconds=([\d.]+)", log)
    rates = re.findall(r"collection=train .*?timing/steps_per_second=([\d.]+)", log)
    return {"compilation_seconds": float(compile_s[0]) if compile_s else None,
            "steps_per_second": float(rates[-1]) if rates else None}


def ours_reported(model_dir: Path) -> dict:
    rows = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["steps_per_second"] for r in rows if r.get("steps_per_second")]
    return {"steps_per_second": rates[-1] if rates else None}


def schedule(cfg: Config, trainers: tuple[str, ...] = TRAINERS) -> list[tuple[str, int]]:
    """The runs in the order they are made: round by round, each round every trainer at both
    lengths, the trainers' order rotated by one each round (no trainer always goes first)."""
    order = []
    for r in range(cfg.repeats):
        names = trainers[r % len(trainers):] + trainers[:r % len(trainers)]
        for steps in (cfg.short_steps, cfg.steps):
            order += [(name, steps) for name in names]
    return order


def benchmark(cfg: Config, trainers: tuple[str, ...] = TRAINERS) -> dict:
    from hypermoe_jax.data import catalog

    catalog.fetch("wiki")  # a no-op when it is cached
    walls = {name: {cfg.short_steps: [], cfg.steps: []} for name in trainers}
    reported: dict[str, list[dict]] = {name: [] for name in trainers}
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "xla_cache"
        if "ours_warm_cache" in trainers:  # fill the cache: one untimed run of each length
            for steps in (cfg.short_steps, cfg.steps):
                run(trainer_argv("ours_warm_cache", cfg, Path(tmp) / f"warm_{steps}", steps),
                    trainer_env("ours_warm_cache", cache))
        for i, (name, steps) in enumerate(schedule(cfg, trainers)):
            model_dir = Path(tmp) / f"{i}_{name}_{steps}"
            wall, log = run(trainer_argv(name, cfg, model_dir, steps), trainer_env(name, cache))
            walls[name][steps].append(wall)
            print(f"{name:16s} {steps:4d} steps: {wall:7.1f} s wall", flush=True)
            if steps == cfg.steps:
                reported[name].append(t5x_reported(log) if name == "t5x"
                                      else ours_reported(model_dir))
    return summarize(walls, reported, cfg.short_steps, cfg.steps)


def _median(xs):
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def summarize(walls: dict[str, dict[int, list[float]]], reported: dict[str, list[dict]],
              short: int, steps: int) -> dict:
    """Per trainer: the walls, their medians and relative spread, the fixed cost (median short
    wall) and the steady steps/s from the medians (None where the long runs were not slower:
    noise larger than the steps' time); then every trainer's ratios to ``t5x``."""
    out: dict = {}
    for name, w in walls.items():
        med = {n: _median(w[n]) for n in (short, steps)}
        extra = med[steps] - med[short]
        rate = (steps - short) / extra if extra > 0 else None
        reps = reported.get(name, [])
        own = {key: _median([r.get(key) for r in reps]) for key in
               sorted({k for r in reps for k in r})}
        out[name] = {"wall_seconds": {str(n): [round(x, 2) for x in w[n]] for n in w},
                     "median_wall_seconds": {str(n): round(v, 2) for n, v in med.items()},
                     "relative_spread": {str(n): round((max(w[n]) - min(w[n])) / med[n], 3)
                                         for n in (short, steps) if w[n]},
                     "fixed_seconds": round(med[short], 2),
                     "steps_per_second": None if rate is None else round(rate, 3),
                     "reported_median": own}
    base = out.get("t5x")
    ratios: dict = {}
    for name in out:
        if name == "t5x" or base is None:
            continue
        o = out[name]
        ratios[f"{name}/t5x"] = {
            "wall": {n: round(o["median_wall_seconds"][n] / base["median_wall_seconds"][n], 3)
                     for n in o["median_wall_seconds"]},
            "steps_per_second": (round(o["steps_per_second"] / base["steps_per_second"], 3)
                                 if o["steps_per_second"] and base["steps_per_second"] else None),
            "reported_steps_per_second": (
                round(o["reported_median"]["steps_per_second"]
                      / base["reported_median"]["steps_per_second"], 3)
                if o["reported_median"].get("steps_per_second")
                and base["reported_median"].get("steps_per_second") else None)}
    out["ratios"] = ratios
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--trainers", default=",".join(TRAINERS),
                        help=f"comma-separated, of {', '.join(TRAINERS)}")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("repeats", args.repeats),
                                                         ("steps", args.steps)) if v})
    trainers = tuple(t for t in args.trainers.split(",") if t)
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown or not trainers:
        parser.error(f"--trainers: unknown {unknown}; choose from {', '.join(TRAINERS)}")
    import jax

    result = {
        "benchmark": "t5x_trainer",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "config": dataclasses.asdict(cfg),
        "quick": args.quick,
        "trainers": list(trainers),
        "results": benchmark(cfg, trainers),
    }
    out = args.out or (DEFAULT_OUT if not args.quick else
                       DEFAULT_OUT.with_name("t5x_trainer_quick.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["results"]
    for name in trainers:
        print(f"{name:16s} fixed {r[name]['fixed_seconds']:6.1f} s  steady steps/s "
              f"{r[name]['steps_per_second']}  own report {r[name]['reported_median']}")
    for key, ratio in r["ratios"].items():
        print(f"{key}: {ratio}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
