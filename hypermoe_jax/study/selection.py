"""What a HyperMoE checkpoint holds, recomputed from its parameters in numpy: the top-1
selection embeddings and generated HyperExperts of every MoE layer, how alike the selection
embeddings are within and across layers and beside the router's weights, how large the
HyperExperts are beside the experts; and the trainable parameter count of a run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hypermoe_jax.study.settings import StudyError


def parameter_count(ckpt_dir: Path) -> int:
    """Trainable parameters (the ``params`` collection) of a run's latest checkpoint."""
    return int(sum(np.size(x) for x in _leaves(checkpoint_params(ckpt_dir))))


def _leaves(tree) -> list:
    if isinstance(tree, Mapping):
        return [x for v in tree.values() for x in _leaves(v)]
    return [tree]


def checkpoint_params(ckpt_dir: Path) -> dict[str, Any]:
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
    params = checkpoint_params(ckpt_dir)
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

