"""Hugging Face folders read and written without torch, checked against files the real libraries
wrote (``tests/goldens/hf_switch``: ``transformers``' ``save_pretrained``; ``tests/goldens/hf_io``:
``torch.save``, ``safetensors`` and ``huggingface_hub``, by ``goldens/make_hf_io_goldens.py``)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import sys
import types
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from hypermoe_jax.convert import hf_io

GOLDENS = Path(__file__).resolve().parent / "goldens"
HF_IO = GOLDENS / "hf_io"
SWITCH_CASES = sorted(p.name for p in (GOLDENS / "hf_switch").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(HF_IO / "expected.npz") as npz:
        return {k: npz[k] for k in npz.files}


def _check_expected(tensors: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(tensors) == sorted(expected)
    for name, want in expected.items():
        got = tensors[name]
        want_dtype = np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else want.dtype
        assert got.dtype == want_dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=name)


# ------------------------------------------------------------ files written by the real libraries


def test_hf_io_goldens_were_checked_against_the_real_libraries():
    versions = json.loads((HF_IO / "versions.json").read_text())
    assert versions["torch"].startswith("2.13.0") and versions["transformers"] == "5.24.0"
    assert versions["checks"] and all(versions["checks"].values()), versions["checks"]
    assert any("bytes == safetensors.torch.save" in name for name in versions["checks"])


@pytest.mark.parametrize("case", SWITCH_CASES)
def test_reads_transformers_safetensors(case, tmp_path):
    folder = GOLDENS / "hf_switch" / case
    config = hf_io.read_config(folder)
    tensors = hf_io.read_state_dict(folder)
    d_model, d_ff, experts = config["d_model"], config["d_ff"], config["num_experts"]
    assert tensors["shared.weight"].shape == (config["vocab_size"], d_model)
    assert all(v.dtype == np.float32 for v in tensors.values())
    # Sparse blocks as transformers places them: i % step == 1 (every block when step is 1).
    for stack, layers, step in (("encoder", config["num_layers"], config["encoder_sparse_step"]),
                                ("decoder", config["num_decoder_layers"],
                                 config["decoder_sparse_step"])):
        sparse = {i for i in range(layers) if step == 1 or i % step == 1}
        mlp = 1 if stack == "encoder" else 2
        for i in range(layers):
            prefix = f"{stack}.block.{i}.layer.{mlp}.mlp"
            assert (f"{prefix}.router.classifier.weight" in tensors) == (i in sparse), prefix
            if i in sparse:
                assert tensors[f"{prefix}.router.classifier.weight"].shape == (experts, d_model)
                for e in range(experts):
                    expert = f"{prefix}.experts.expert_{e}"
                    assert tensors[f"{expert}.wi.weight"].shape == (d_ff, d_model)
                    assert tensors[f"{expert}.wo.weight"].shape == (d_model, d_ff)
            else:
                assert tensors[f"{prefix}.wi.weight"].shape == (d_ff, d_model)
    # Re-written with transformers' metadata: the very bytes the safetensors library wrote.
    original = folder / "model.safetensors"
    assert hf_io.read_safetensors_metadata(original) == {"format": "pt"}
    hf_io.write_safetensors(tmp_path / "model.safetensors", tensors, {"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == original.read_bytes()
    again = hf_io.read_safetensors(tmp_path / "model.safetensors")
    assert list(again) == list(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(again[name], value)


def test_reads_torch_save_checkpoint(expected):
    path = HF_IO / "bin" / "pytorch_model.bin"
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
        records = [n for n in z.namelist() if "/data/" in n]
    # The golden goes through every form torch 2.13 writes ...
    for name in (b"_rebuild_tensor_v2", b"_rebuild_tensor_v3", b"UntypedStorage",
                 b"_rebuild_parameter\n", b"_rebuild_parameter_with_state",
                 b"_rebuild_from_type_v2", b"BFloat16Storage", b"BoolStorage"):
        assert name in pkl, name
    # ... and its four views share one storage record.
    assert len(records) == len(expected) - 3
    tensors = hf_io.read_torch_bin(path)
    _check_expected(tensors, expected)
    # Views of one storage come back as separate C-order arrays with their own values.
    base = tensors["shared.base"]
    np.testing.assert_array_equal(tensors["shared.transposed"], base.T)
    np.testing.assert_array_equal(tensors["shared.rows"], base[1:3])
    np.testing.assert_array_equal(tensors["shared.strided"], base[::2, 1::2])
    assert all(v.flags.c_contiguous and v.flags.writeable for v in tensors.values())
    tensors["shared.rows"][:] = 0
    assert np.all(base[1:3] != 0)
    assert tensors["scalar"].shape == () and float(tensors["scalar"]) == 3.5
    assert hf_io.read_state_dict(HF_IO / "bin").keys() == tensors.keys()


def test_reads_sharded_torch_checkpoint(expected):
    index = json.loads((HF_IO / "bin_sharded" / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    _check_expected(hf_io.read_state_dict(HF_IO / "bin_sharded"), expected)


def test_reads_safetensors_save_file(expected, tmp_path):
    path = HF_IO / "single" / "model.safetensors"
    tensors = hf_io.read_safetensors(path)
    _check_expected(tensors, expected)
    assert all(v.flags.writeable for v in tensors.values())
    # Re-written: the bytes safetensors.torch.save_file wrote, bf16, 0-d and empty included.
    hf_io.write_safetensors(tmp_path / "model.safetensors", tensors,
                            hf_io.read_safetensors_metadata(path))
    assert (tmp_path / "model.safetensors").read_bytes() == path.read_bytes()


def test_reads_sharded_safetensors(expected):
    folder = HF_IO / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    tensors = hf_io.read_state_dict(folder)
    _check_expected(tensors, expected)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())


def test_prefers_safetensors_over_torch(tmp_path, expected):
    shutil.copy(HF_IO / "bin" / "pytorch_model.bin", tmp_path)
    hf_io.write_safetensors(tmp_path / "model.safetensors", {"only": np.ones(2, np.float32)})
    assert list(hf_io.read_state_dict(tmp_path)) == ["only"]
    (tmp_path / "model.safetensors").unlink()
    _check_expected(hf_io.read_state_dict(tmp_path), expected)


# ----------------------------------------------------------------------------- safetensors


def test_write_safetensors_layout_and_round_trip(tmp_path):
    tensors = {
        "b": np.arange(6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
        "a": np.array([1, -2], dtype=">i8"),  # big-endian input
        "bf": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
        "h": np.array([[0.5]], dtype=np.float16),
        "flag": np.array([True, False, True]),
        "s": np.float64(2.25),
        "e": np.zeros((0, 4), np.int32),
    }
    path = tmp_path / "x.safetensors"
    hf_io.write_safetensors(path, tensors, {"k": "v"})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header.pop("__metadata__") == {"k": "v"}
    # The safetensors library's order: largest dtype first, then by name.
    assert list(header) == ["a", "s", "b", "e", "bf", "h", "flag"]
    offsets = [header[k]["data_offsets"] for k in header]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(raw) - 8 - n
    assert all(prev[1] == nxt[0] for prev, nxt in zip(offsets, offsets[1:]))
    assert header["a"] == {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}
    assert raw[8 + n:8 + n + 16] == struct.pack("<2q", 1, -2)
    assert header["bf"]["dtype"] == "BF16" and header["s"]["shape"] == []
    back = hf_io.read_safetensors(path)
    for name, value in tensors.items():
        value = np.asarray(value)
        assert back[name].dtype == value.dtype.newbyteorder("="), name
        assert back[name].shape == value.shape, name
        np.testing.assert_array_equal(back[name], value)
    assert hf_io.read_safetensors_metadata(path) == {"k": "v"}
    hf_io.write_safetensors(path, {"z": np.zeros(1, np.uint8)})
    assert hf_io.read_safetensors_metadata(path) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]  # no temporary file left


@pytest.mark.parametrize("tensors, metadata, match", [
    ({"x": np.array(["a"])}, None, "dtype <U1"),
    ({"x": np.zeros(2, np.complex128)}, None, "cast it first"),
    ({"__metadata__": np.zeros(2)}, None, "names are non-empty strings"),
    ({"x": np.zeros(2)}, {"step": 3}, "metadata must map str to str"),
])
def test_write_safetensors_refuses(tmp_path, tensors, metadata, match):
    with pytest.raises(ValueError, match=match):
        hf_io.write_safetensors(tmp_path / "x.safetensors", tensors, metadata)
    assert not any(tmp_path.iterdir())


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("content, match", [
    (b"\x01\x02", "fewer than the 8"),
    (struct.pack("<Q", 1000) + b"{}", "header length 1000 exceeds"),
    (struct.pack("<Q", 4) + b"nope", "header is not JSON"),
    (_safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "truncated or damaged"),
    (_safetensors_bytes({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not 8 bytes"),
    (_safetensors_bytes({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "y": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 6),
     "overlap or leave a gap"),
    (_safetensors_bytes({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
     "dtype 'Q7'"),
])
def test_read_safetensors_refuses_damaged_files(tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        hf_io.read_safetensors(path)


def test_truncated_golden_is_refused(tmp_path):
    data = (HF_IO / "single" / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        hf_io.read_state_dict(tmp_path)


# ---------------------------------------------------------------------------------- torch


def _torch_zip(path: Path, payload: bytes, records: dict[str, bytes] | None = None) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for name, data in (records or {}).items():
            z.writestr(f"archive/data/{name}", data)


def test_read_torch_bin_runs_no_pickled_code(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "pytorch_model.bin"
    _torch_zip(path, pickle.dumps({"w": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"refers to io\.open, .*it is refused"):
        hf_io.read_torch_bin(path)
    assert not marker.exists()


def test_read_torch_bin_refuses_legacy_and_non_checkpoints(tmp_path):
    legacy = tmp_path / "legacy.bin"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"more")
    with pytest.raises(ValueError, match="legacy .*Re-save it"):
        hf_io.read_torch_bin(legacy)
    other = tmp_path / "other.bin"
    other.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a torch.save checkpoint"):
        hf_io.read_torch_bin(other)


def test_read_torch_bin_refuses_out_of_bounds_views_and_missing_records(tmp_path):
    golden = zipfile.ZipFile(HF_IO / "bin" / "pytorch_model.bin")
    pkl = next(n for n in golden.namelist() if n.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]
    records = {n[len(prefix) + 5:]: golden.read(n) for n in golden.namelist()
               if n.startswith(prefix + "data/")}
    payload = golden.read(pkl)
    missing = tmp_path / "missing.bin"
    _torch_zip(missing, payload, {k: v for k, v in records.items() if k != min(records)})
    with pytest.raises(ValueError, match="storage record .* is missing"):
        hf_io.read_torch_bin(missing)
    short = tmp_path / "short.bin"
    _torch_zip(short, payload, {k: v[: len(v) // 2] for k, v in records.items()})
    with pytest.raises(ValueError, match="fewer than"):
        hf_io.read_torch_bin(short)
    storage = hf_io._Storage("0", np.arange(6, dtype=np.float32).tobytes(), None, False)
    with pytest.raises(ValueError, match="reaches element 6"):
        hf_io._strided(storage, np.dtype(np.float32), 2, (2, 2), (3, 1))
    np.testing.assert_array_equal(hf_io._strided(storage, np.dtype(np.float32), 2, (2, 2), (1, 2)),
                                  [[2, 4], [3, 5]])


# ------------------------------------------------------------------------- folders, errors


def test_write_hf_folder_round_trip_and_refusal(tmp_path):
    folder = tmp_path / "model"
    config = {"model_type": "switch_transformers", "d_model": 4, "nested": {"a": [1, 2]}}
    tensors = {"w": np.arange(8, dtype=np.float32).reshape(2, 4),
               "bf": np.ones(3, ml_dtypes.bfloat16)}
    assert hf_io.write_hf_folder(folder, config, tensors) == folder
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert hf_io.read_config(folder) == config
    assert (folder / "config.json").read_text().startswith('{\n  "model_type"')
    assert hf_io.read_safetensors_metadata(folder / "model.safetensors") == {"format": "pt"}
    back = hf_io.read_state_dict(folder)
    np.testing.assert_array_equal(back["w"], tensors["w"])
    assert back["bf"].dtype == ml_dtypes.bfloat16
    assert hf_io.resolve_source(folder) == folder

    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        hf_io.write_hf_folder(folder, {"other": 1}, {"x": np.zeros(1, np.float32)})
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    with pytest.raises(FileExistsError, match="is a file"):
        hf_io.write_hf_folder(folder / "config.json", config, tensors)

    (folder / "pytorch_model.bin").write_bytes(b"stale")
    hf_io.write_hf_folder(folder, {"other": 1}, {"x": np.zeros(1, np.float32)}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert hf_io.read_config(folder) == {"other": 1}
    assert list(hf_io.read_state_dict(folder)) == ["x"]

    empty = tmp_path / "empty"
    empty.mkdir()
    hf_io.write_hf_folder(empty, config, tensors)  # an existing empty folder is fine
    assert hf_io.read_config(empty) == config


def test_write_hf_folder_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        hf_io.write_hf_folder(tmp_path / "a", {"x": object()}, {"w": np.zeros(1)})
    with pytest.raises(ValueError, match="cast it first"):
        hf_io.write_hf_folder(tmp_path / "b", {}, {"w": np.zeros(1, np.complex128)})
    assert not any(tmp_path.iterdir())


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    hf_io.write_safetensors(path, {"old": np.ones(4, np.float32)})
    old = path.read_bytes()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        hf_io.write_safetensors(path, {"new": np.zeros(100, np.float32)})
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_read_state_dict_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        hf_io.read_state_dict(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected one of "
                       r"model\.safetensors.*it holds README\.md, config\.json"):
        hf_io.read_state_dict(tmp_path)
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        shutil.copy(HF_IO / "sharded" / name, tmp_path)
    with pytest.raises(FileNotFoundError,
                       match=r"incomplete: .*2 shard\(s\) and model-00002-of-00002\.safetensors "
                             r"is missing"):
        hf_io.read_state_dict(tmp_path)
    shutil.copy(HF_IO / "sharded" / "model-00001-of-00002.safetensors",
                tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="more than one shard"):
        hf_io.read_state_dict(tmp_path)


def test_read_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        hf_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hf_io.read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON list, not an object"):
        hf_io.read_config(tmp_path)


def test_resolve_source_local_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf_io.resolve_source(tmp_path / "missing")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError,
                       match=r"has no config\.json \(it holds model\.safetensors\)"):
        hf_io.resolve_source(tmp_path)
    with pytest.raises(ValueError, match="is a file"):
        hf_io.resolve_source(tmp_path / "model.safetensors")
    assert hf_io.resolve_source(GOLDENS / "hf_switch" / "no_drop") == \
        GOLDENS / "hf_switch" / "no_drop"


def _fake_hub(monkeypatch, snapshot_download) -> list[dict]:
    calls: list[dict] = []

    def record(**kwargs):
        calls.append(kwargs)
        return snapshot_download(**kwargs)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=record))
    return calls


def test_resolve_source_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "org/name" is not a local folder here
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"'google/switch-base-8' .*pip install "
                       r"huggingface_hub, or download the folder and pass its path"):
        hf_io.resolve_source("google/switch-base-8")

    def offline(**kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    calls = _fake_hub(monkeypatch, offline)
    with pytest.raises(FileNotFoundError, match=r"'google/switch-base-8' .*OSError: We couldn't "
                       r"connect.*pass its local path") as info:
        hf_io.resolve_source("google/switch-base-8", cache_dir="/cache")
    assert isinstance(info.value.__cause__, OSError)
    assert calls == [{"repo_id": "google/switch-base-8", "cache_dir": "/cache",
                      "allow_patterns": hf_io.HUB_PATTERNS}]

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    _fake_hub(monkeypatch, lambda **kwargs: str(snapshot))
    with pytest.raises(FileNotFoundError, match="has no config.json: it is not a model"):
        hf_io.resolve_source("org/not-a-model")
    (snapshot / "config.json").write_text("{}")
    assert hf_io.resolve_source("org/model") == snapshot
    # A local folder wins over the hub id it looks like.
    (tmp_path / "org" / "model").mkdir(parents=True)
    (tmp_path / "org" / "model" / "config.json").write_text("{}")
    assert hf_io.resolve_source("org/model") == Path("org/model")
    # Not an org/name id: no download is tried.
    calls = _fake_hub(monkeypatch, offline)
    with pytest.raises(FileNotFoundError, match="does not exist.*org/name"):
        hf_io.resolve_source(os.path.join("a", "b", "c"))
    assert calls == []
