"""Writes the Hugging Face file-format goldens in ``tests/goldens/hf_io/``.

Run by hand from the repository root, with ``torch``, ``transformers``, ``safetensors``,
``huggingface_hub`` and ``ml_dtypes`` installed (CPU is enough; nothing is downloaded)::

    python -m venv /tmp/hfenv && /tmp/hfenv/bin/pip install torch==2.13.0 \\
        transformers==5.24.0 safetensors numpy ml_dtypes
    /tmp/hfenv/bin/python tests/goldens/make_hf_io_goldens.py

(written with torch 2.13.0, transformers 5.24.0, safetensors 0.8.0, huggingface_hub 2.4.0,
numpy 2.4.6, ml_dtypes 0.7.0; ``versions.json`` records them). One small state dict -- float32,
float16, bfloat16, float64, int64, int32, int16, int8, uint8, uint16 and bool tensors, a
transposed view, a row slice and a strided slice sharing one storage, a 0-d tensor, an empty
tensor, an ``nn.Parameter``, and a tensor and a parameter with Python attributes -- is written
by the real libraries as:

* ``bin/pytorch_model.bin``: ``torch.save`` of the state dict itself (views and shared storage
  kept);
* ``bin_sharded/``: ``pytorch_model-0000k-of-00002.bin`` (``torch.save`` of each shard) and
  ``pytorch_model.bin.index.json``, split by ``huggingface_hub.split_torch_state_dict_into_shards``
  as ``transformers`` does;
* ``single/model.safetensors``: ``safetensors.torch.save_file`` of contiguous copies (metadata
  ``{"format": "pt"}``, as ``transformers`` writes);
* ``sharded/``: ``model-0000k-of-00002.safetensors`` and ``model.safetensors.index.json``, by
  ``huggingface_hub.save_torch_state_dict`` (the same split, shard names and index as
  ``save_pretrained``);
* ``expected.npz``: the values as numpy (bfloat16 as float32).

Each folder has a small ``config.json``. The script also checks ``hypermoe_jax.convert.hf_io``
against the real libraries and records the results in ``versions.json`` (it stops when one
fails): ``safetensors.numpy.load_file`` and ``safetensors.torch.load_file`` read files written by
``hf_io.write_safetensors`` back exactly, ``hf_io.write_safetensors`` writes the same bytes as
``safetensors.torch.save``, and ``hf_io.read_torch_bin`` reads what ``torch.load`` reads. The tests
read the goldens without torch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
import transformers

HERE = Path(__file__).resolve().parent
OUT = HERE / "hf_io"
HF_IO = HERE.parents[1] / "hypermoe_jax" / "convert" / "hf_io.py"
CONFIG = {"model_type": "hf_io_golden", "architectures": ["None"], "note": "file-format golden"}


def _load_hf_io():
    """``hypermoe_jax.convert.hf_io`` from its file (numpy and ml_dtypes only; no jax)."""
    spec = importlib.util.spec_from_file_location("hf_io", HF_IO)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    base = torch.randn(4, 6)
    return {
        "float32": torch.randn(3, 4),
        "float16": torch.randn(2, 5).half(),
        "bfloat16": torch.randn(4, 3).to(torch.bfloat16),
        "float64": torch.randn(3, dtype=torch.float64),
        "int64": torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4) * 123456789012,
        "int32": torch.tensor([-(2**31), -1, 0, 2**31 - 1], dtype=torch.int32),
        "int16": torch.tensor([[-32768, 7], [0, 32767]], dtype=torch.int16),
        "int8": torch.tensor([-128, -1, 0, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 1, 200, 255], dtype=torch.uint8),
        "uint16": torch.tensor([0, 1, 40000, 65535], dtype=torch.uint16),
        "bool": torch.rand(3, 3) > 0.5,
        "shared.base": base,
        "shared.transposed": base.t(),  # a non-contiguous view of base's storage
        "shared.rows": base[1:3],  # a slice of base: the same storage at offset 6
        "shared.strided": base[::2, 1::2],  # offset 1, strides (12, 2)
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(2, 3)),
        # Python attributes: pickled through _rebuild_from_type_v2 and
        # _rebuild_parameter_with_state.
        "tagged": tagged(torch.randn(2), note="tensor"),
        "tagged_param": tagged(torch.nn.Parameter(torch.randn(3)), note="parameter"),
    }


def tagged(t: torch.Tensor, **attributes) -> torch.Tensor:
    for name, value in attributes.items():
        setattr(t, name, value)
    return t


def as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy().copy()


def two_shards(tensors: dict[str, torch.Tensor]) -> int:
    """The smallest shard size at which huggingface_hub splits ``tensors`` into two shards."""
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    for size in range(total // 2, total):
        split = huggingface_hub.split_torch_state_dict_into_shards(tensors, max_shard_size=size)
        if len(split.filename_to_tensors) == 2:
            return size
    raise AssertionError("no shard size gives two shards")


def write_config(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")


def check(name: str, ok: bool, checks: dict[str, bool]) -> None:
    checks[name] = bool(ok)
    if not ok:
        raise SystemExit(f"check failed: {name}")
    print(f"ok: {name}")


def main() -> None:
    hf_io = _load_hf_io()
    tensors = state_dict()
    contiguous = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    if OUT.exists():
        shutil.rmtree(OUT)
    for sub in ("bin", "bin_sharded", "single", "sharded"):
        (OUT / sub).mkdir(parents=True)
        write_config(OUT / sub)

    torch.save(tensors, OUT / "bin" / "pytorch_model.bin")

    split = huggingface_hub.split_torch_state_dict_into_shards(
        tensors, filename_pattern="pytorch_model{suffix}.bin",
        max_shard_size=two_shards(tensors))
    for filename, names in split.filename_to_tensors.items():
        torch.save({n: tensors[n] for n in names}, OUT / "bin_sharded" / filename)
    (OUT / "bin_sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": split.metadata, "weight_map": split.tensor_to_filename},
        indent=2, sort_keys=True) + "\n")

    safetensors.torch.save_file(contiguous, OUT / "single" / "model.safetensors",
                                metadata={"format": "pt"})
    huggingface_hub.save_torch_state_dict(contiguous, OUT / "sharded",
                                          max_shard_size=two_shards(contiguous))
    shards = sorted(p.name for p in (OUT / "sharded").glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors",
                      "model-00002-of-00002.safetensors"], shards

    np.savez_compressed(OUT / "expected.npz", **{
        k: (v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy())
        for k, v in tensors.items()})

    # hf_io against the real libraries.
    checks: dict[str, bool] = {}
    arrays = {k: as_numpy(v) for k, v in tensors.items()}
    with tempfile.TemporaryDirectory() as tmp:
        numpy_ok = {k: v for k, v in arrays.items() if v.dtype != ml_dtypes.bfloat16}
        hf_io.write_safetensors(Path(tmp) / "np.safetensors", numpy_ok, {"format": "np"})
        back = safetensors.numpy.load_file(Path(tmp) / "np.safetensors")
        check("safetensors.numpy.load_file reads hf_io.write_safetensors (all but bf16)",
              back.keys() == numpy_ok.keys() and all(
                  back[k].dtype == v.dtype and back[k].shape == v.shape
                  and np.array_equal(back[k], v) for k, v in numpy_ok.items()), checks)
        hf_io.write_safetensors(Path(tmp) / "pt.safetensors", arrays, {"format": "pt"})
        back = safetensors.torch.load_file(Path(tmp) / "pt.safetensors")
        check("safetensors.torch.load_file reads hf_io.write_safetensors (all dtypes)",
              back.keys() == contiguous.keys() and all(
                  torch.equal(back[k], v) for k, v in contiguous.items()), checks)
        mine = (Path(tmp) / "pt.safetensors").read_bytes()
        check("hf_io.write_safetensors bytes == safetensors.torch.save bytes",
              mine == safetensors.torch.save(contiguous, metadata={"format": "pt"}), checks)
    loaded = torch.load(OUT / "bin" / "pytorch_model.bin", weights_only=True)
    read = hf_io.read_torch_bin(OUT / "bin" / "pytorch_model.bin")
    check("hf_io.read_torch_bin == torch.load",
          read.keys() == loaded.keys() and all(
              read[k].dtype == as_numpy(v).dtype and np.array_equal(read[k], as_numpy(v))
              for k, v in loaded.items()), checks)
    check("hf_io.read_state_dict(sharded) == safetensors.torch.load_file(single)",
          all(np.array_equal(hf_io.read_state_dict(OUT / "sharded")[k], as_numpy(v))
              for k, v in safetensors.torch.load_file(OUT / "single" / "model.safetensors")
              .items()), checks)

    (OUT / "versions.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__,
         "safetensors": safetensors.__version__, "huggingface_hub": huggingface_hub.__version__,
         "numpy": np.__version__, "ml_dtypes": ml_dtypes.__version__, "checks": checks},
        indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    main()
