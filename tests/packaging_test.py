"""The package as ``pip install .`` ships it: the wheel holds the gin files (``gin/`` of the
repository, installed as package data ``hypermoe_jax/gin/``), and an installed copy trains from
any directory, finding its own gin files.
"""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import write_offline_cache

REPO = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "README.md", "hypermoe_jax", "tasks", "gin"]
# A tiny decoder-only Switch LM (d 32, 2 layers) on the fake offline wiki_char_lm cache, 2 steps.
TINY_RUN = [
    "--gin_file=models/switch_lm_tiny.gin", "--gin_file=runs/pretrain.gin",
    "--gin.MIXTURE_OR_TASK_NAME=wiki_char_lm", "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
    "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=4", "--gin.LOG_EVERY=1",
    "--gin.sizes.decoder_only.emb_dim=32", "--gin.sizes.decoder_only.mlp_dim=64",
    "--gin.sizes.decoder_only.num_heads=2", "--gin.sizes.decoder_only.head_dim=16",
    "--gin.sizes.decoder_only.num_layers=2",
    "--gin.hypermoe_jax.training.train.train.train_eval_dataset_cfg=None",
]


def _pip(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The wheel of a copy of the sources, installed with ``pip install --target``."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        elif path.exists():
            shutil.copy2(path, src / name)
    wheels = root / "wheels"
    build = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src),
                 cwd=root)
    if build.returncode != 0:  # no (recent enough) setuptools here: build in isolation
        build = _pip("wheel", "--no-deps", "-q", "-w", str(wheels), str(src), cwd=root)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("hypermoe_jax-*.whl")
    install = _pip("install", "--no-deps", "-q", "--target", str(root / "site"), str(wheel),
                   cwd=root)
    assert install.returncode == 0, install.stdout + install.stderr
    return root / "site"


def _env(site: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(site), "JAX_PLATFORMS": "cpu", **extra}


def test_pyproject_lists_every_package():
    """The package list is explicit (gin/ is mapped to ``hypermoe_jax.gin``): it must name every
    package of the sources and every directory of gin/."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {"hypermoe_jax.gin": "gin"}
    found = [".".join(init.parent.relative_to(REPO).parts)
             for top in ("hypermoe_jax", "tasks") for init in (REPO / top).rglob("__init__.py")]
    gin_dirs = [REPO / "gin", *(d for d in (REPO / "gin").rglob("*")
                                if d.is_dir() and d.name != "__pycache__")]
    gin_packages = [".".join(["hypermoe_jax.gin", *d.relative_to(REPO / "gin").parts])
                    for d in gin_dirs]
    assert sorted(config["packages"]) == sorted({*found, *gin_packages})


def test_wheel_holds_the_gin_files(site):
    installed = sorted(p.relative_to(site / "hypermoe_jax/gin").as_posix()
                       for p in (site / "hypermoe_jax/gin").rglob("*.gin"))
    in_repo = sorted(p.relative_to(REPO / "gin").as_posix() for p in (REPO / "gin").rglob("*.gin"))
    assert installed == in_repo and "runs/pretrain.gin" in installed
    assert not (site / "gin").exists()  # never a top-level `gin` (gin-config's name)


def test_installed_package_trains_from_another_directory(site, tmp_path):
    """``python -m hypermoe_jax.train`` of the installed copy, run from a directory that is not
    the repository (and holds ``runs/`` and ``models/`` directories of its own)."""
    work = tmp_path / "elsewhere"
    for d in ("runs/quickstart", "models/architectures"):
        (work / d).mkdir(parents=True)
    cache = tmp_path / "cache"
    write_offline_cache(cache, wiki_repeat=100)
    env = _env(site, HYPERMOE_CACHE=str(cache))

    probe = subprocess.run(
        [sys.executable, "-c", "import json, hypermoe_jax, tasks; "
         "from hypermoe_jax.training import gin_utils; "
         "print(json.dumps([hypermoe_jax.__file__, tasks.__file__, gin_utils.search_paths()]))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    package, task_module, paths = json.loads(probe.stdout.splitlines()[-1])
    assert Path(package).parent == site / "hypermoe_jax"
    assert Path(task_module).parent == site / "tasks"
    assert paths == [str(site / "hypermoe_jax/gin"), str(work)]

    model_dir = tmp_path / "model"
    proc = subprocess.run(
        [sys.executable, "-m", "hypermoe_jax.train", *TINY_RUN, f"--gin.MODEL_DIR={model_dir}"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 2/2" in proc.stdout, proc.stdout
    metrics = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(m.get("step", 0) for m in metrics) == 2
    assert (model_dir / "checkpoints").is_dir()
    noisy = [line for line in proc.stderr.splitlines()
             if "cuda" in line.lower() or "cuinit" in line.lower()]
    assert not noisy, proc.stderr
