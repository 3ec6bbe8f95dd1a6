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
HyperMoE's generator and MoE-Share's adapter are scaled to the tiny model (``SCALED_ADAPTERS``:
bottleneck d / 8), so that they add about what they add to Switch-base-8 with the paper's sizes
(+3.3% and +0.4% of the parameters; +4.2% and +0.2% there) rather than nearly tripling a d-64
model.

Each study writes ``OUT/results.json`` (every seed's figures, mean +- std, the paper's direction
and whether this run agrees) and PNG figures under ``OUT/figures``. Runs (checkpoints,
``metrics.jsonl``) go under ``WORK_DIR/<study>/``; a finished run is reused when the study is run
again with the same settings, an unfinished one resumes. Nothing is chosen on the test split.

Settings: ``FULL`` (sized for about 90 min for both studies on 2 idle CPU cores, estimated from
the step rates) and ``QUICK`` (``--quick``, a smoke run: too short to test the claims);
``--seeds``, ``--steps``, ``--batch_size``, ``--model_size``, ``--num_experts`` and
``--gin.NAME=VALUE`` (every run) scale them, e.g. on a GPU. ``--report_only`` trains nothing and
reports the runs finished so far.

The package: ``settings`` (what a study runs), ``runs`` (the trainer, in this process, and the
records a finished run leaves), ``hyperrouter`` and ``hypermoe`` (the two studies), ``selection``
(HyperMoE's selection embeddings from a checkpoint), ``stats`` (means, standard errors, claims),
``report`` (figures and tables) and ``cli`` (the flags and ``run_study``).
"""

from hypermoe_jax.study.cli import compilation_cache, main, run_study, setting_from_flags
from hypermoe_jax.study.hypermoe import hypermoe_study
from hypermoe_jax.study.hyperrouter import hyperrouter_study
from hypermoe_jax.study.report import figures, summary_markdown
from hypermoe_jax.study.selection import (
    generated_adapters,
    parameter_count,
    selection_analysis,
    selection_embeddings,
)
from hypermoe_jax.study.settings import (
    FT_VARIANTS,
    FULL,
    LM_VARIANTS,
    QUICK,
    SCALED_ADAPTERS,
    STUDIES,
    Setting,
    StudyError,
)
from hypermoe_jax.study.stats import compare, mean_curve, summarize

__all__ = [
    "FT_VARIANTS", "FULL", "LM_VARIANTS", "QUICK", "SCALED_ADAPTERS", "STUDIES", "Setting",
    "StudyError", "compare", "compilation_cache", "figures", "generated_adapters",
    "hypermoe_study", "hyperrouter_study", "main", "mean_curve", "parameter_count",
    "run_study", "selection_analysis", "selection_embeddings", "setting_from_flags",
    "summarize", "summary_markdown",
]
