"""HyperRouter vs SMoE-Dropout (Do et al., EMNLP 2023): decoder-only character-level LMs on the
Wikipedia sample, trained with the same data, steps and hyper-parameters while k grows from
``k_min`` to every expert; each final checkpoint evaluated on the test split with k = 1, 2, 4, ...
experts per token. Paper: HyperRouter below SMoE-Dropout at every k, by far at k = 1; bits per
character fall with k."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypermoe_jax.study import runs
from hypermoe_jax.study.settings import LM_TASK, LM_VARIANTS, Setting
from hypermoe_jax.study.stats import compare, mean_curve, summarize


def lm_run(s: Setting, variant: str, seed: int, run_dir: Path) -> dict[str, Any]:
    files = [f"models/{variant}_lm_tiny.gin"]
    model = runs.common_bindings(s, seed=seed, lengths=s.lengths, batch_size=s.batch_size) + [
        f"NUM_SELECTED = {s.num_experts}", f"K_MIN = {s.k_min}", f"MIXTURE_OR_TASK_NAME = "
        f"{LM_TASK!r}", "DROPOUT_RATE = 0.0", *s.bindings]

    def make():
        t0 = time.time()
        summary = runs.gin_run(files + ["runs/pretrain.gin"], model + runs.train_bindings(
            s, run_dir, s.steps) + [f"hypermoe_jax.training.optimizers.rsqrt_schedule."
                                    f"warmup_steps = {s.warmup_steps}"])
        runs.check_done(summary, run_dir)
        seconds = time.time() - t0
        result = runs.gin_run(files + ["runs/eval.gin"], model + runs.eval_bindings(
            s, run_dir, "test", "test") + [f"ACTIVE_K_VALUES = {tuple(s.k_values)!r}"])
        return {"variant": variant, "seed": seed, "train_seconds": seconds,
                "final_valid_bits_per_char": summary["eval"]["bits_per_token"],
                "test_bits_per_char": {k: v["bits_per_token"]
                                       for k, v in result["active_k"].items()},
                "curves": runs.curves(run_dir)}

    return runs.cached(run_dir / runs.RECORD, make)


def hyperrouter_study(s: Setting, work: Path, say: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    by_variant: dict[str, list] = {v: [] for v in LM_VARIANTS}
    for seed in s.seeds:
        for v in LM_VARIANTS:
            say(f"== hyperrouter study: {v}, seed {seed}")
            with runs.skip_unfinished():
                by_variant[v].append(lm_run(s, v, seed, work / "runs" / v / f"seed{seed}"))
    runs.check_some(by_variant)
    ks = [str(k) for k in s.k_values]
    test = {LM_VARIANTS[v]: {k: summarize([r["test_bits_per_char"][k] for r in rs]) for k in ks}
            for v, rs in by_variant.items()}
    hr, sd = (test[LM_VARIANTS[v]] for v in LM_VARIANTS)
    k1, kmax = ks[0], ks[-1]
    claims = [compare(f"test bits/char at k={k1}: HyperRouter < SMoE-Dropout",
                      "WikiText-103 perplexity at one expert: 65 (HyperRouter) vs 561",
                      hr[k1]["values"], sd[k1]["values"], lower_is_better=True)]
    claims += [compare(f"test bits/char at k={k}: HyperRouter < SMoE-Dropout",
                       "HyperRouter better at every k (Table 1, Figure 3)",
                       hr[k]["values"], sd[k]["values"], lower_is_better=True) for k in ks[1:]]
    gap = {k: sd[k]["mean"] - hr[k]["mean"] for k in ks}
    claims.append({
        "claim": f"HyperRouter's advantage is largest with few experts (k={k1} vs k={kmax})",
        "paper": "the gap shrinks as k grows (65 vs 561 at k=1, close at k=16)",
        "ours": f"SMoE-Dropout - HyperRouter: {gap[k1]:+.3f} at k={k1}, {gap[kmax]:+.3f} at "
                f"k={kmax}",
        "agrees": bool(gap[k1] > gap[kmax])})
    for name, t in test.items():
        means = [t[k]["mean"] for k in ks]
        claims.append({
            "claim": f"{name}: test bits/char fall as k grows ({', '.join(ks)})",
            "paper": "enwik8 / text8 bits per character fall with k (Figure 3)",
            "ours": " > ".join(f"{x:.3f}" for x in means),
            "agrees": bool(all(a > b for a, b in zip(means, means[1:])))})
    return {
        "study": "hyperrouter", "task": LM_TASK,
        "metric": "bits per character (test split; the model's bits_per_token on bytes)",
        "variants": list(LM_VARIANTS.values()),
        "test_bits_per_char": test,
        "final_valid_bits_per_char": {LM_VARIANTS[v]: summarize(
            [r["final_valid_bits_per_char"] for r in rs]) for v, rs in by_variant.items()},
        "valid_curves": {LM_VARIANTS[v]: mean_curve([r["curves"]["eval/bits_per_token"]
                                                     for r in rs]) for v, rs in by_variant.items()},
        "load": {LM_VARIANTS[v]: rs[0]["curves"]["load"] for v, rs in by_variant.items()},
        "claims": claims,
        "train_seconds": {LM_VARIANTS[v]: summarize([r["train_seconds"] for r in rs])
                          for v, rs in by_variant.items()},
    }
