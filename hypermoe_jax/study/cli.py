"""``python -m hypermoe_jax.study``: the flags, the settings they scale, and ``run_study`` (every
run of a study made or reused, then ``results.json``, the figures and ``summary.md``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypermoe_jax import plot
from hypermoe_jax.study import runs
from hypermoe_jax.study.hypermoe import hypermoe_study
from hypermoe_jax.study.hyperrouter import hyperrouter_study
from hypermoe_jax.study.report import figures, summary_markdown
from hypermoe_jax.study.settings import FULL, QUICK, STUDIES, Setting, StudyError


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
    try:
        with runs.reporting_only(report_only):
            results = fn(setting, work, say)
    except runs.NotFinished as e:
        raise StudyError(f"{e} has not finished: nothing to report yet.") from None
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


def setting_from_flags(study: str, args: argparse.Namespace, bindings: list[str]) -> Setting:
    s = (QUICK if args.quick else FULL)[study]
    changes: dict[str, Any] = {}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    for field in ("steps", "batch_size", "pretrain_steps", "pretrain_batch_size",
                  "learning_rate"):
        if getattr(args, field) is not None:
            changes[field] = getattr(args, field)
    if args.model_size is not None:
        changes["model_size"] = args.model_size
    if study == "hypermoe" and (getattr(args, "paper_adapter_sizes", False) or (
            args.model_size is not None and args.model_size != s.model_size)):
        changes["finetune_bindings"] = ()  # SCALED_ADAPTERS fit the tiny model only
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


def compilation_cache(path: Path) -> None:
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
    p.add_argument("--pretrain_batch_size", type=int, default=None,
                   help="hypermoe: the Switch pretraining's batch")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="hypermoe: the fine-tuning's (constant, AdamW) learning rate")
    p.add_argument("--model_size", default=None, help="size preset (architectures/sizes.py)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: report the finished runs (e.g. of a study still running)")
    p.add_argument("--paper_adapter_sizes", action="store_true",
                   help="hypermoe: the paper's HyperExpert / adapter sizes (bottleneck 64, "
                   "hypernetwork 128) instead of ones scaled to the tiny model; implied by a "
                   "--model_size other than tiny")
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
            s = setting_from_flags(study, args, bindings)
            for name in (("wiki",) if study == "hyperrouter" else
                         ("sotu", "shakespeare", "sentiment")):
                catalog.fetch(name, verbose=True)
            out = Path(args.out) / study if args.out and args.study == "all" else Path(
                args.out or f"benchmarks/results/study/{study}{suffix}")
            compilation_cache(work_root / ".jax_cache")
            run_study(study, s, out.absolute(), work_root, report_only=args.report_only)
            print(f"Results: {out / 'results.json'}")
    except (StudyError, plot.PlotError, DataError, *errors.USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
