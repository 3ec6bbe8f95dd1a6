"""Writes the Hugging Face Switch Transformers goldens in ``tests/goldens/hf_switch/`` (and
dense T5 ones in ``tests/goldens/hf_t5/``).

Run by hand, with ``torch`` and ``transformers`` installed (CPU is enough; nothing is downloaded:
the models are random and small)::

    python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers==5.24.0 \\
        safetensors numpy
    /tmp/hf/bin/python tests/goldens/make_hf_switch_goldens.py

Each case directory holds what a user's Hugging Face folder holds (``config.json``,
``model.safetensors``) and ``goldens.npz``: the inputs, the fp32 logits, the routing of every
sparse layer (the chosen expert and whether capacity kept the token), the router probabilities,
the losses (cross entropy, router z and load-balancing losses of each stack) and greedy decoding
tokens. ``versions.json`` records the library versions. The tests read them without torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

OUT = Path(__file__).resolve().parent / "hf_switch"
OUT_T5 = Path(__file__).resolve().parent / "hf_t5"
# Dense T5: v1.1 (gated-GELU, untied output layer) and the original T5 (ReLU, tied).
T5_CASES = {
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, seed=4),
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True, seed=5),
}
BASE = dict(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_heads=2, num_experts=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=16,
            dropout_rate=0.0, router_jitter_noise=0.0, decoder_start_token_id=0, pad_token_id=0,
            eos_token_id=1)
CASES = {
    # No token dropped (capacity >= sequence length), two sparse layers per stack.
    "no_drop": dict(num_layers=4, num_decoder_layers=4, encoder_sparse_step=2,
                    decoder_sparse_step=2, expert_capacity=64, seed=0, pad=False),
    # Capacity 2 per expert and sequence: tokens dropped in sequence order.
    "capacity_drop": dict(num_layers=4, num_decoder_layers=4, encoder_sparse_step=2,
                          decoder_sparse_step=2, expert_capacity=2, seed=1, pad=False),
    # Padded encoder inputs (attention_mask) and padded labels.
    "padded": dict(num_layers=4, num_decoder_layers=4, encoder_sparse_step=2,
                   decoder_sparse_step=2, expert_capacity=64, seed=2, pad=True),
    # Layer counts not divisible by the step; different encoder / decoder steps (1: all sparse).
    "uneven_steps": dict(num_layers=3, num_decoder_layers=2, encoder_sparse_step=2,
                         decoder_sparse_step=1, expert_capacity=64, seed=3, pad=False),
}
BATCH, ENC_LEN, DEC_LEN, NEW_TOKENS = 3, 12, 8, 6


def _routers(model) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in model.named_modules()
            if type(m).__name__ == "SwitchTransformersTop1Router"]


def make_case(name: str, spec: dict) -> None:
    spec = dict(spec)
    seed, pad = spec.pop("seed"), spec.pop("pad")
    torch.manual_seed(seed)
    config = SwitchTransformersConfig(**BASE, **spec)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, BASE["vocab_size"], (BATCH, ENC_LEN))
    labels = rng.integers(2, BASE["vocab_size"], (BATCH, DEC_LEN))
    attention_mask = np.ones_like(input_ids)
    if pad:
        for row, n in enumerate((0, 3, 7)):
            if n:
                input_ids[row, -n:] = 0
                attention_mask[row, -n:] = 0
        labels[1, -3:] = -100
    routing: dict[str, np.ndarray] = {}
    hooks = []
    for layer, router in _routers(model):
        def hook(module, args, out, layer=layer):
            expert_index, probs, logits = out
            routing[f"{layer}/expert"] = expert_index.argmax(-1).numpy()
            routing[f"{layer}/kept"] = (expert_index.sum(-1) > 0).numpy()
            routing[f"{layer}/prob"] = probs[..., 0].detach().numpy()
            routing[f"{layer}/logits"] = logits.detach().numpy()
        hooks.append(router.register_forward_hook(hook))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                    labels=torch.tensor(labels), output_router_logits=True)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        generated = model.generate(
            input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
            max_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1).numpy()

    def scalar(x):
        return float(x) if not torch.is_tensor(x) else float(x.item())

    logits = out.logits.numpy()
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, logits.shape[-1]),
                                           torch.tensor(labels).reshape(-1), ignore_index=-100)
    target = OUT / name
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target, safe_serialization=True)
    np.savez_compressed(
        target / "goldens.npz", input_ids=input_ids, attention_mask=attention_mask,
        labels=labels, logits=logits, generated=generated, loss=scalar(out.loss),
        cross_entropy=scalar(ce), encoder_z_loss=scalar(out.encoder_z_loss),
        encoder_aux_loss=scalar(out.encoder_aux_loss), decoder_z_loss=scalar(out.decoder_z_loss),
        decoder_aux_loss=scalar(out.decoder_aux_loss),
        router_layers=np.array(sorted({k.rsplit("/", 1)[0] for k in routing})),
        **{f"routing/{k}": v for k, v in routing.items()})
    dropped = sum(int((~routing[k]).sum()) for k in routing if k.endswith("/kept"))
    print(f"{name}: {len(_routers(model))} sparse layers, {dropped} tokens dropped, "
          f"loss {scalar(out.loss):.4f}")


def make_t5_case(name: str, spec: dict) -> None:
    spec = dict(spec)
    seed = spec.pop("seed")
    torch.manual_seed(seed)
    base = {k: v for k, v in BASE.items() if k != "num_experts" and "router" not in k}
    config = T5Config(**base, num_layers=3, num_decoder_layers=2, **spec)
    model = T5ForConditionalGeneration(config).eval()
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(2, BASE["vocab_size"], (BATCH, ENC_LEN))
    labels = rng.integers(2, BASE["vocab_size"], (BATCH, DEC_LEN))
    attention_mask = np.ones_like(input_ids)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                    labels=torch.tensor(labels))
    target = OUT_T5 / name
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target, safe_serialization=True)
    np.savez_compressed(target / "goldens.npz", input_ids=input_ids, labels=labels,
                        attention_mask=attention_mask, logits=out.logits.numpy(),
                        loss=float(out.loss.item()))
    print(f"{name}: loss {float(out.loss.item()):.4f}")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, spec in CASES.items():
        make_case(name, spec)
    OUT_T5.mkdir(parents=True, exist_ok=True)
    for name, spec in T5_CASES.items():
        make_t5_case(name, spec)
    (OUT / "versions.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__,
         "numpy": np.__version__}, indent=2) + "\n")


if __name__ == "__main__":
    main()
