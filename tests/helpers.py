"""Fixtures shared by several test modules: tiny MoE configs, and a tiny fake offline data cache
(the layout that ``python -m hypermoe_jax.data fetch`` writes; ``hypermoe_jax/data/catalog.py``).
"""

import json

import jax

from hypermoe_jax.data import catalog, text
from hypermoe_jax.layers import variants
from hypermoe_jax.layers.dispatch import DispatchConfig
from hypermoe_jax.layers.experts import ExpertsConfig
from hypermoe_jax.layers.hyper_experts import HyperExpertsConfig
from hypermoe_jax.layers.routers import RouterConfig


def all_eqns(jaxpr):
    """Every equation of a (closed) jaxpr, those of nested jaxprs included (scan, cond, jit,
    shard_map, custom_vjp bodies)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    yield from all_eqns(sub)


# Small HyperExperts (b = d_e = hidden = 8) for tiny test models.
HYPER_SMALL = HyperExpertsConfig(bottleneck_dim=8, expert_embed_dim=8, selection_hidden_dim=8,
                                 selection_dim=8, hyper_hidden_dim=8)


def tiny_moe(variant: str, num_experts: int = 4, *, num_selected: int = 1,
             train_capacity_factor: float = 1.25, eval_capacity_factor: float = 2.0,
             jitter_noise: float = 0.0) -> variants.MoeConfig:
    """The ``MoeConfig`` of ``variant`` for tiny test models (HyperExperts: ``HYPER_SMALL``)."""
    return variants.moe_config(
        variant,
        experts=ExpertsConfig(num_experts=num_experts),
        router=RouterConfig(num_selected=num_selected, jitter_noise=jitter_noise),
        dispatch=DispatchConfig(train_capacity_factor=train_capacity_factor,
                                eval_capacity_factor=eval_capacity_factor),
        hyper_experts=HYPER_SMALL,
    )

PROSE = [
    "Fellow citizens of the Senate and House of Representatives: the state of the union is strong.",
    "We have met to consider the welfare of the people, the progress of commerce and the peace.",
    "To be, or not to be, that is the question: whether tis nobler in the mind to suffer.",
    "The slings and arrows of outrageous fortune, or to take arms against a sea of troubles.",
]


def write_offline_cache(cache, wiki_repeat: int = 40, text_repeat: int = 1):
    """Writes every offline dataset (``catalog.DATASETS``) under ``cache``; the wiki XML holds
    ``wiki_repeat`` copies of one page header and line (40: 5.6 kB, 280-byte validation / test
    splits); each prose split ``text_repeat`` times two documents, each sentiment split
    ``text_repeat`` times six labelled lines."""
    # (The two adjacent literals are one string: the header repeats with the line.)
    xml = ("<mediawiki><page><title>A</title><revision><text xml:space=\"preserve\">"
           "'''Anarchism''' is a [[political philosophy|philosophy]] of 1 thing.\n" * wiki_repeat
           + "</text></revision></page></mediawiki>\n").encode()
    contents = {}
    for split, part in text.split_bytes(xml).items():
        contents[f"wiki/char/{split}.raw"] = part
    for split, part in text.split_bytes(text.wikifil(xml)).items():
        contents[f"wiki/text8/{split}.txt"] = part
    contents["wiki/enwik8_sample.xml"] = xml
    for name in ("sotu", "shakespeare"):
        for split in text.SPLITS:
            contents[f"{name}/{split}.txt"] = ("\n".join(PROSE + ["", *PROSE[:2], ""]) + "\n"
                                               ) * text_repeat
    for sub in ("rotten_tomatoes", "uci"):
        for split in text.SPLITS:
            contents[f"sentiment/{sub}/{split}.tsv"] = (
                "positive\tA charming, funny film.\nnegative\tDull and far too long.\n"
                * 3 * text_repeat)
    for rel, body in contents.items():
        p = cache / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body if isinstance(body, bytes) else body.encode())
    for name in catalog.DATASETS:
        (cache / name / "info.json").write_text(
            json.dumps({"name": name, "format_version": catalog.FORMAT_VERSION}))


T5X_REQUIRED_ENV = "HYPERMOE_REQUIRE_T5X"


def import_t5x():
    """Imports upstream T5X for the tests that run it; skips them when it is not installed,
    except where ``$HYPERMOE_REQUIRE_T5X`` is set (CI, which installs it): there it must be."""
    import os

    import pytest

    if os.environ.get(T5X_REQUIRED_ENV):
        import t5x.contrib.moe.partitioning  # noqa: F401
        import t5x.train  # noqa: F401
        return
    pytest.importorskip("t5x.train", reason="upstream T5X is not installed (see README.md)")
