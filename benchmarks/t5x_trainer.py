"""The same model, task and steps under upstream ``t5x.train`` and under this project's trainer.

    python benchmarks/t5x_trainer.py            # hypermoe_lm_tiny, wiki_char_lm, 128 tokens x 16
    python benchmarks/t5x_trainer.py --quick    # a smoke configuration (a few minutes)

Both trainers run as the user runs them (a subprocess each, its own gin files: ``t5x/<model>.gin``
+ ``t5x/runs/pretrain.gin`` for T5X; ``models/<model>.gin`` + ``runs/pretrain.gin`` here), with no
evaluation and one checkpoint at the end. Each runs twice, with ``steps`` and ``2 * steps`` steps,
all four runs interleaved, so that

* steady ``steps/s`` = ``steps / (wall(2 steps) - wall(steps))`` -- after compilation, measured
  the same way for both from outside;
* ``overhead`` = ``wall(steps) - steps / steps_per_s``: start-up, data pipeline, initialisation,
  compilation and checkpoints;

and what each trainer reports itself (T5X: ``timing/compilation_seconds`` and the last epoch's
``timing/steps_per_second``; here: the last logged ``steps_per_second``). Target: this trainer is
not slower than T5X (ratio of steady steps/s >= 1). Needs T5X installed and the ``wiki`` dataset
(``python -m hypermoe_jax.data fetch wiki``, done here when missing). Writes
``benchmarks/results/t5x_trainer.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
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


FULL = Config()
QUICK = Config(length=32, batch_size=8, steps=6)


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


def ours_argv(cfg: Config, model_dir: Path, steps: int) -> list[str]:
    macros = {**_common(cfg, model_dir, steps), "RANDOM_SEED": 0, "EVAL_PERIOD": steps,
              "CHECKPOINT_PERIOD": steps, "LOG_EVERY": max(steps // 2, 1)}
    return [sys.executable, "-m", "hypermoe_jax.train", f"--gin_file=models/{cfg.model}.gin",
            "--gin_file=runs/pretrain.gin", *[f"--gin.{k}={v}" for k, v in macros.items()],
            "--gin.hypermoe_jax.training.train.train.train_eval_dataset_cfg=None"]


def run(argv: list[str]) -> tuple[float, str]:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", ""),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
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


def benchmark(cfg: Config) -> dict:
    from hypermoe_jax.data import catalog

    catalog.fetch("wiki")  # a no-op when it is cached
    walls: dict[str, dict[int, float]] = {"t5x": {}, "ours": {}}
    reported: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (cfg.steps, 2 * cfg.steps):
            for name in ("t5x", "ours"):
                model_dir = Path(tmp) / f"{name}_{steps}"
                argv = (t5x_argv if name == "t5x" else ours_argv)(cfg, model_dir, steps)
                wall, log = run(argv)
                walls[name][steps] = wall
                print(f"{name:5s} {steps:4d} steps: {wall:7.1f} s wall", flush=True)
                if steps == 2 * cfg.steps:
                    reported[name] = (t5x_reported(log) if name == "t5x"
                                      else ours_reported(model_dir))
    return summarize(walls, reported, cfg.steps)


def summarize(walls: dict[str, dict[int, float]], reported: dict[str, dict], steps: int) -> dict:
    """Steady steps/s and overhead of each trainer from its walls at ``steps`` and ``2 * steps``
    (None where the longer run was not slower: noise larger than the steps' time)."""
    out: dict = {}
    for name, w in walls.items():
        extra = w[2 * steps] - w[steps]
        rate = steps / extra if extra > 0 else None
        out[name] = {"wall_seconds": {str(k): round(v, 2) for k, v in w.items()},
                     "steps_per_second": None if rate is None else round(rate, 3),
                     "overhead_seconds": None if rate is None else round(w[steps] - steps / rate,
                                                                         2),
                     "reported": reported.get(name, {})}
    a, b = out["ours"]["steps_per_second"], out["t5x"]["steps_per_second"]
    out["ratio_steps_per_second_ours_over_t5x"] = round(a / b, 3) if a and b else None
    out["ratio_wall_ours_over_t5x"] = {
        str(s): round(walls["ours"][s] / walls["t5x"][s], 3) for s in walls["ours"]}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
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
        "results": benchmark(cfg),
    }
    out = args.out or (DEFAULT_OUT if not args.quick else
                       DEFAULT_OUT.with_name("t5x_trainer_quick.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    r = result["results"]
    print(f"steady steps/s: ours {r['ours']['steps_per_second']}  t5x "
          f"{r['t5x']['steps_per_second']}  ratio {r['ratio_steps_per_second_ours_over_t5x']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
