"""``hypermoe_jax.study``: the statistics and claims (against independent computations), the
HyperMoE selection-embedding analysis (against the generator module), and a tiny end-to-end
HyperRouter study through the real trainer on the fake offline cache (per-seed figures equal to
the trainer's own eval output)."""

import dataclasses
import importlib.util
import json
import math
import os
import statistics

import jax
import numpy as np
import pytest
from flax import linen as nn
from helpers import write_offline_cache

from hypermoe_jax import study
from hypermoe_jax.data import cache as cache_lib
from hypermoe_jax.layers import hyper_experts as hx

# Figures need matplotlib (to be a project dependency); the rest of the study does not.
needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_summarize_matches_statistics():
    values = [2.5, 3.25, 2.875, 4.0]
    s = study.summarize(values)
    assert s["mean"] == pytest.approx(statistics.mean(values))
    assert s["std"] == pytest.approx(statistics.stdev(values))  # sample std (n - 1)
    assert s["n"] == 4 and s["values"] == values
    assert study.summarize([1.5])["std"] == 0.0


@pytest.mark.parametrize("ours, other, lower, agrees, clear", [
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], True, True, True),     # far apart, lower wins
    ([1.0, 1.1, 0.9], [2.0, 2.1, 1.9], False, False, False),  # higher is better: it loses
    ([1.0, 1.6, 0.4], [1.2, 1.8, 0.6], True, True, False),    # lower on average, within noise
])
def test_compare(ours, other, lower, agrees, clear):
    c = study.compare("c", "p", ours, other, lower_is_better=lower)
    diff = np.mean(ours) - np.mean(other)
    se = math.sqrt(np.var(ours, ddof=1) / 3 + np.var(other, ddof=1) / 3)
    assert c["difference"] == pytest.approx(diff)
    assert c["standard_error"] == pytest.approx(se)
    assert (c["agrees"], c["clear"]) == (agrees, clear)


def test_mean_curve_over_the_common_steps():
    a = {"step": [10, 20, 30], "value": [3.0, 2.0, 1.0]}
    b = {"step": [10, 20], "value": [5.0, 4.0]}  # a seed that evaluated less often
    c = study.mean_curve([a, b])
    assert c["step"] == [10, 20] and c["n"] == 2
    np.testing.assert_allclose(c["mean"], [4.0, 3.0])
    np.testing.assert_allclose(c["std"], [np.std([3, 5], ddof=1), np.std([2, 4], ddof=1)])


def _generator_params(num_layers=2, num_experts=4, d_model=8):
    cfg = hx.HyperExpertsConfig(bottleneck_dim=4, expert_embed_dim=6, selection_hidden_dim=5,
                                selection_dim=7, hyper_hidden_dim=8)
    gen = hx.HyperExpertGenerator(num_layers=num_layers, num_experts=num_experts, num_selected=1,
                                  d_model=d_model, config=cfg)
    params = nn.unbox(gen.init(jax.random.PRNGKey(3)))["params"]
    return gen, jax.tree.map(np.asarray, params)


def test_selection_embeddings_equal_the_generator_modules():
    gen, params = _generator_params()
    masks = hx.unselected_masks(4, 1)  # [N, N]: row i = every expert but i
    s_tilde = np.einsum("mn,lne->lme", masks, params["expert_embedding"])
    want = gen.apply({"params": params}, s_tilde, method=lambda g, x: g._selection_mlp(x))
    np.testing.assert_allclose(study.selection_embeddings(params), want, rtol=1e-5, atol=1e-6)
    # The HyperExperts themselves: the module's per-set adapters (set i: expert i selected).
    adapters = gen.apply({"params": params})
    mine = study.generated_adapters(params)
    for key in ("w_down", "b_down", "w_up", "b_up"):
        np.testing.assert_allclose(mine[key], adapters[key], rtol=1e-4, atol=1e-9)


def test_selection_analysis_of_a_checkpoint(tmp_path):
    """Saved as the trainer saves (orbax, ``<step>/state`` with ``params``); the similarities
    against a loop over pairs."""
    import orbax.checkpoint as ocp

    _, gen = _generator_params(num_layers=2, num_experts=4, d_model=8)
    routers = np.random.default_rng(0).normal(size=(2, 8, 4))  # scanned: [layers, d, N]
    wi, wo = np.ones((2, 4, 8, 3)), np.full((2, 4, 3, 8), 2.0)  # |wi| |wo| = sqrt(24) sqrt(96) = 48
    params = {"decoder": {"hyper_generator": gen, "layers": {"mlp": {
        "router": {"router_weights": {"kernel": routers}},
        "experts": {"wi_0": wi, "wi_1": wi, "wo": wo}}}}}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt" / "7" / "state", {"params": params})
    ckpt.wait_until_finished()
    a = study.selection_analysis(tmp_path / "ckpt")
    sel = study.selection_embeddings(gen)

    def cos(u, v):
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
    within = np.mean([cos(sel[m, i], sel[m, j]) for m in range(2) for i, j in pairs])
    across = np.mean([cos(sel[0, i], sel[1, j]) for i in range(4) for j in range(4)])
    corr = np.mean([np.corrcoef([cos(sel[m, i], sel[m, j]) for i, j in pairs],
                                [cos(routers[m][:, i], routers[m][:, j]) for i, j in pairs])[0, 1]
                    for m in range(2)])
    assert a["within_layer"] == pytest.approx(within, abs=1e-6)
    assert a["across_layers"] == pytest.approx(across, abs=1e-6)
    assert a["router_correlation"] == pytest.approx(corr, abs=1e-6)
    ad = study.generated_adapters(gen)
    hyper = np.mean([np.linalg.norm(ad["w_down"][m, i]) * np.linalg.norm(ad["w_up"][m, i])
                     for m in range(2) for i in range(4)])
    assert a["hyper_to_expert_scale"] == pytest.approx(hyper / 48.0, rel=1e-6)
    assert a["hyper_to_expert_scale"] < 1e-2  # hyperfanin: the HyperExperts start tiny
    assert a["labels"][:5] == ["dec L0 e0", "dec L0 e1", "dec L0 e2", "dec L0 e3", "dec L1 e0"]
    assert np.asarray(a["similarity"]).shape == (8, 8)


# A HyperRouter study small enough for a test: 2-layer LMs (d 32), 4 experts, 4 steps.
TINY = dataclasses.replace(
    study.FULL["hyperrouter"], seeds=(0, 1), steps=4, batch_size=8,
    lengths=(("targets", 32),), num_experts=4, expert_hidden_dim=16, k_min=2,
    k_values=(1, 4), eval_period=2, eval_steps=1, test_steps=1, log_every=2,
    bindings=("sizes.decoder_only.emb_dim = 32", "sizes.decoder_only.mlp_dim = 64",
              "sizes.decoder_only.num_heads = 2", "sizes.decoder_only.head_dim = 16",
              "sizes.decoder_only.num_layers = 2"))


@pytest.fixture()
def compile_cache(tmp_path):
    """JAX's persistent compilation cache for one test (the seeds share their programs), as
    ``study.main`` sets it; the previous settings are put back."""
    from jax.experimental.compilation_cache import compilation_cache

    flags = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in flags}
    study.compilation_cache(tmp_path / "jax_cache")
    compilation_cache.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    write_offline_cache(cache, wiki_repeat=100)
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(cache))
    return cache


@needs_matplotlib
def test_tiny_hyperrouter_study_end_to_end(tmp_path, fake_cache, compile_cache, monkeypatch):
    out, work = tmp_path / "out", tmp_path / "work"
    res = study.run_study("hyperrouter", TINY, out, work, say=lambda _: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["claims"] == res["claims"] and saved["setting"] == TINY.fingerprint()
    # Every seed's figure is the trainer's own test eval at that k (eval_metrics.json).
    for variant, name in study.LM_VARIANTS.items():
        for k in ("1", "4"):
            want = [json.loads((work / "hyperrouter" / "runs" / variant / f"seed{s}" / "test"
                                / "eval_metrics.json").read_text())["active_k"][k]
                    ["bits_per_token"] for s in (0, 1)]
            got = res["test_bits_per_char"][name][k]
            assert got["values"] == pytest.approx(want)
            assert got["mean"] == pytest.approx(np.mean(want))
            assert got["std"] == pytest.approx(np.std(want, ddof=1))
        curve = res["valid_curves"][name]
        assert curve["step"] == [2, 4] and curve["n"] == 2
        assert set(res["load"][name]) == {"decoder/layer_1"}
    by_claim = {c["claim"]: c for c in res["claims"]}
    hr, sd = (res["test_bits_per_char"][n]["1"]["mean"] for n in study.LM_VARIANTS.values())
    assert by_claim["test bits/char at k=1: HyperRouter < SMoE-Dropout"]["agrees"] == (hr < sd)
    assert sorted(res["figures"]) == sorted([
        "figures/valid_bits_per_char.png", "figures/k_sweep.png",
        "figures/expert_load_hyperrouter.png", "figures/expert_load_smoe_dropout.png"])
    for f in res["figures"]:
        assert (out / f).read_bytes()[:8] == PNG_MAGIC

    # Again: the finished runs are reused, not retrained.
    def no_training(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(study.runs, "gin_run", no_training)
    again = study.run_study("hyperrouter", TINY, out, work, say=lambda _: None)
    assert again["test_bits_per_char"] == res["test_bits_per_char"]
    # Reporting the finished runs only: a run without its record is left out.
    (work / "hyperrouter" / "runs" / "smoe_dropout" / "seed1" / "study_run.json").unlink()
    part = study.run_study("hyperrouter", TINY, tmp_path / "part", work, say=lambda _: None,
                           report_only=True)
    sd = part["test_bits_per_char"]["SMoE-Dropout"]["1"]
    assert sd["n"] == 1 and sd["values"] == res["test_bits_per_char"]["SMoE-Dropout"]["1"][
        "values"][:1]
    assert "seeds per variant HyperRouter 2, SMoE-Dropout 1" in (
        tmp_path / "part" / "summary.md").read_text()
    with pytest.raises(study.StudyError, match="nothing to report"):
        study.run_study("hyperrouter", TINY, tmp_path / "none", tmp_path / "empty",
                        report_only=True)
    # Other settings in the same work directory are refused.
    with pytest.raises(study.StudyError, match="holds runs of other settings"):
        study.run_study("hyperrouter", dataclasses.replace(TINY, steps=5), out, work)


def test_cli_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        study.main(["nonsense"])
    assert study.main(["hyperrouter", "--quick", "--seeds", "1"]) == 1
    assert "at least 2 seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["hyperrouter", "--bogus"])
    assert "gin bindings are --gin.NAME=VALUE" in capsys.readouterr().err


def test_missing_data_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr("hypermoe_jax.data.catalog.fetch", _no_network)
    assert study.main(["hyperrouter", "--quick", "--work_dir", str(tmp_path / "w")]) == 1
    assert "error: no network here" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "w")


def _no_network(name, *a, **k):
    raise cache_lib.FetchError("no network here")


@needs_matplotlib
def test_hypermoe_study_aggregates_its_runs(tmp_path, monkeypatch):
    """The HyperMoE study's tables and claims from its runs (the runs themselves stubbed here:
    the trainer path is the one the HyperRouter test above runs, plus fine-tuning)."""
    acc = {("switch", 1): [80.0, 82.0, 81.0], ("moe_share", 1): [81.0, 81.5, 82.5],
           ("hypermoe", 1): [83.0, 84.0, 82.0], ("switch", 2): [82.0, 83.0, 84.0],
           ("hypermoe", 2): [83.0, 83.5, 84.5]}
    curve = {"step": [5, 10], "value": [1.0, 0.5]}
    load = {"decoder/layer_1": {"step": [5, 10], "load": [[0.5, 0.5], [0.4, 0.6]],
                                "dropped": [0.0, 0.1]}}
    curves = {"eval/cross_ent_loss": curve, "load": load}

    def finetune(s, variant, k, seed, ckpt, vocab_gin, run_dir):
        return {"seed": seed, "valid_accuracy": acc[variant, k][seed] - 1,
                "test_loss": 1.0 - acc[variant, k][seed] / 100,
                "test_accuracy": acc[variant, k][seed], "train_seconds": 1.0, "curves": curves}

    sel = {"labels": ["a", "b"], "similarity": [[1.0, 0.5], [0.5, 1.0]], "within_layer": 0.5,
           "across_layers": 0.1, "router_correlation": 0.2, "hyper_to_expert_scale": 1e-3}
    monkeypatch.setattr(study.hypermoe, "pretrain", lambda s, work, vocab: (
        work / "ckpt", {"final_valid_loss": 2.0, "train_seconds": 3.0, "curves": curves}))
    monkeypatch.setattr(study.hypermoe, "finetune_run", finetune)
    monkeypatch.setattr(study.hypermoe, "selection_analysis", lambda ckpt: sel)
    monkeypatch.setattr(study.hypermoe, "parameter_count", lambda ckpt: 7)
    setting = dataclasses.replace(study.FULL["hypermoe"], top_k=(1, 2))
    res = study.run_study("hypermoe", setting, tmp_path / "out", tmp_path / "work",
                          say=lambda _: None)
    assert res["accuracy"]["HyperMoE"]["test"]["mean"] == pytest.approx(83.0)
    assert res["accuracy"]["Switch (MoE) top-2"]["valid"]["values"] == [81.0, 82.0, 83.0]
    claims = {c["claim"]: c for c in res["claims"]}
    c = claims["test accuracy: HyperMoE > Switch (MoE)"]
    assert c["agrees"] and c["difference"] == pytest.approx(2.0)
    assert c["clear"]  # 2.0 > 2 * sqrt(1 / 3 + 1 / 3) = 1.63
    assert claims["test accuracy: HyperMoE > MoE-Share"]["difference"] == pytest.approx(
        83.0 - 81.666666, abs=1e-5)
    assert res["test_loss"]["HyperMoE"]["mean"] == pytest.approx(0.17)
    assert claims["test loss (teacher-forced label): HyperMoE < Switch (MoE)"]["agrees"]
    # gains: top-1 83 - 81 = +2; top-2 83.67 - 83 = +0.67: larger with fewer experts.
    assert res["gain_over_switch_by_top_k"] == pytest.approx({"1": 2.0, "2": 2 / 3})
    assert claims["HyperMoE's gain over Switch is larger at top-1 than at top-2"]["agrees"]
    assert res["selection_embeddings"]["within_layer"]["mean"] == 0.5
    assert (tmp_path / "out" / "summary.md").read_text().count("\n| ") >= 8
    assert {"figures/test_accuracy.png", "figures/selection_similarity.png",
            "figures/valid_loss.png", "figures/expert_load_pretrain.png",
            "figures/expert_load_hypermoe_top_2.png"} <= set(res["figures"])


def test_flags_scale_the_settings():
    import argparse

    args = argparse.Namespace(quick=False, seeds=5, steps=2000, batch_size=64, pretrain_steps=None,
                              pretrain_batch_size=None, model_size="lm_small", num_experts=16,
                              learning_rate=None)
    s = study.setting_from_flags("hyperrouter", args, ["RANDOM_SEED = 3"])
    assert (s.seeds, s.steps, s.batch_size, s.model_size) == ((0, 1, 2, 3, 4), 2000, 64,
                                                              "lm_small")
    assert (s.num_experts, s.k_min, s.k_values) == (16, 8, (1, 2, 4, 8, 16))
    assert s.bindings == ("RANDOM_SEED = 3",)
    hypermoe = study.setting_from_flags("hypermoe", args, [])
    assert hypermoe.k_values == study.FULL["hypermoe"].k_values
    # The scaled adapters fit the tiny model: another size, or the flag, takes the paper's.
    assert hypermoe.finetune_bindings == ()
    args.model_size = None
    assert study.setting_from_flags("hypermoe", args, []).finetune_bindings == (
        study.SCALED_ADAPTERS)
    args.paper_adapter_sizes = True
    assert study.setting_from_flags("hypermoe", args, []).finetune_bindings == ()
    args.learning_rate = 3e-3
    assert study.setting_from_flags("hypermoe", args, []).learning_rate == 3e-3


def test_scaled_adapters_add_the_papers_share_of_parameters():
    """The hypermoe study's fine-tuned models (its gins and bindings): HyperMoE's generator and
    MoE-Share's adapter add about the share of parameters they add to Switch-base-8 with the
    paper's sizes, not a multiple of the tiny model."""
    import gin

    from hypermoe_jax.architectures import sizes
    from hypermoe_jax.training import gin_utils

    def trainable(gin_file, bindings=()):
        model = gin_utils.model_from_gin([gin_file], list(bindings))
        gin.clear_config()
        return sizes.parameter_counts(model.config)["params"]

    s = study.FULL["hypermoe"]
    tiny = {v: trainable(f"models/{v}_{s.model_size}.gin", [
        f"NUM_EXPERTS = {s.num_experts}", "NUM_EMBEDDINGS = 8192", *s.finetune_bindings])
        for v in study.FT_VARIANTS}
    base = {v: trainable(f"models/{v}_base_8.gin") for v in ("switch", "hypermoe", "moe_share")}
    paper_hyper = base["hypermoe"] / base["switch"] - 1
    paper_share = base["moe_share"] / base["switch"] - 1
    assert 0.03 < paper_hyper < 0.05 and 0 < paper_share < 0.005  # 4.2% and 0.19%
    hyper = tiny["hypermoe"] / tiny["switch"] - 1
    share = tiny["moe_share"] / tiny["switch"] - 1
    assert 0.5 * paper_hyper < hyper < 1.5 * paper_hyper, (hyper, paper_hyper)
    assert 0 < share < 0.01, share
    # The paper's absolute sizes at d 64 (the gins' own): the generator nearly triples the model.
    unscaled = trainable(f"models/hypermoe_{s.model_size}.gin",
                         [f"NUM_EXPERTS = {s.num_experts}", "NUM_EMBEDDINGS = 8192"])
    assert unscaled / tiny["switch"] > 2


def test_hypermoe_runs_through_the_trainer(tmp_path, compile_cache, monkeypatch):
    """The HyperMoE study's own runs with the real trainer on the fake offline cache (model and
    steps shrunk): the Switch pretraining, HyperMoE fine-tuned from its checkpoint with the
    scaled adapters, both splits decoded, then the selection analysis and the parameter count of
    the real checkpoint. The accuracy is that of the predictions file the run decoded."""
    from hypermoe_jax.architectures import sizes
    from hypermoe_jax.study import hypermoe as hm
    from hypermoe_jax.training import gin_utils

    cache = tmp_path / "cache"
    write_offline_cache(cache, text_repeat=20)  # batches of 8 (one row per fake device)
    monkeypatch.setenv(cache_lib.CACHE_ENV, str(cache))
    shrink = tuple(f"sizes.sparse_t5.{k} = {v}" for k, v in (
        ("emb_dim", 32), ("mlp_dim", 64), ("num_heads", 2), ("head_dim", 16),
        ("num_encoder_layers", 2), ("num_decoder_layers", 2)))
    s = dataclasses.replace(study.QUICK["hypermoe"], steps=2, pretrain_steps=2, batch_size=8,
                            pretrain_batch_size=8, bindings=shrink)
    work = tmp_path / "work"
    work.mkdir()
    vocab_gin = work / "offline_vocab.gin"
    vocab_gin.write_text(hm.OFFLINE_VOCAB_GIN)
    ckpt, pre = hm.pretrain(s, work, vocab_gin)
    assert pre["curves"]["load"] and math.isfinite(pre["final_valid_loss"])
    run_dir = work / "hypermoe"
    rec = hm.finetune_run(s, "hypermoe", 1, 0, ckpt, vocab_gin, run_dir)
    for split, key in (("test", "test_accuracy"), ("validation", "valid_accuracy")):
        (preds,) = (run_dir / f"eval_{split}").glob("predictions_*.jsonl")
        rows = [json.loads(line) for line in preds.read_text().splitlines()]
        assert len(rows) == 8  # one batch (test_steps 1)
        assert rec[key] == pytest.approx(100.0 * np.mean([r["target"] == r["prediction"]
                                                          for r in rows]))
    assert rec["test_loss"] == json.loads(
        (run_dir / "eval_test" / "eval_metrics.json").read_text())["cross_ent_loss"]
    # The checkpoint holds the model the study's gins build (scaled adapters included).
    model = gin_utils.model_from_gin(["models/hypermoe_tiny.gin", str(vocab_gin)], [
        f"NUM_EXPERTS = {s.num_experts}", *shrink, *s.finetune_bindings])
    import gin

    gin.clear_config()
    assert study.parameter_count(run_dir / "checkpoints") == sizes.parameter_counts(
        model.config)["params"]
    assert model.config.moe.hyper_experts.bottleneck_dim == 8
    sel = study.selection_analysis(run_dir / "checkpoints")
    assert len(sel["labels"]) == 8  # one encoder and one decoder MoE layer of 4 experts
    assert 0 < sel["hyper_to_expert_scale"] < 1
    # Run again: the record is reused, nothing is trained.
    monkeypatch.setattr(study.runs, "gin_run", lambda *a: pytest.fail("ran again"))
    assert hm.finetune_run(s, "hypermoe", 1, 0, ckpt, vocab_gin, run_dir) == rec
