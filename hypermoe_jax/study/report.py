"""What a study shows: its PNG figures (from ``results.json``'s aggregates, drawn by
``hypermoe_jax.plot``) and its Markdown tables and claims (``summary.md``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hypermoe_jax import plot


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
