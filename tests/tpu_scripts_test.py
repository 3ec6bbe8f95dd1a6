"""Launch scripts: syntax, the commands --dry-run prints, idempotent checks, missing variables.

A fake ``gcloud`` on PATH records every call, so nothing here reaches a cloud."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "tpu_scripts"
ALL = sorted(p.name for p in SCRIPTS.iterdir()
             if p.suffix in (".sh", ".sbatch") and p.name != "common.sh")

TPU = {"TPU_NAME": "hm", "ZONE": "us-central2-b"}
CREATE = {**TPU, "ACCELERATOR_TYPE": "v4-32", "RUNTIME_VERSION": "tpu-ubuntu2204-base"}
LAUNCH = {**TPU, "GIN_FILE": "models/hypermoe_base_8.gin runs/pretrain.gin",
          "MODEL_DIR": "gs://bucket/runs/h8"}
SLURM = {"GIN_FILE": "models/hypermoe_base_8.gin runs/pretrain.gin", "MODEL_DIR": "/shared/h8",
         "SLURM_JOB_NODELIST": "gpu[007-010],big01", "SLURM_NTASKS": "4"}


@pytest.fixture
def fake_bin(tmp_path):
    """A directory with a fake gcloud that logs its argv; `describe` exits $FAKE_DESCRIBE_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "gcloud.log"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n'
        'if [[ "$*" == *" describe "* ]]; then exit "${FAKE_DESCRIBE_RC:-1}"; fi\n'
        "exit 0\n")
    gcloud.chmod(0o755)
    return bin_dir, log


def _run(script, env_vars, *args, fake_bin=None, extra_env=None):
    path = f"{fake_bin[0]}:/usr/bin:/bin" if fake_bin else "/usr/bin:/bin"
    env = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env_vars, **(extra_env or {})}
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True,
                          text=True, timeout=30, check=False)


def _commands(stdout):
    """argv of every '+ ...' line the dry run printed."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _option(argv, name):
    return next(a.split("=", 1)[1] for a in argv if a.startswith(name + "="))


@pytest.mark.parametrize("script", ALL + ["common.sh"])
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)


@pytest.mark.parametrize("script", ALL)
def test_scripts_open_with_variables_and_example(script):
    text = (SCRIPTS / script).read_text()
    head = text.split("set -euo pipefail")[0]
    assert text.startswith("#!/usr/bin/env bash")
    assert "Needs:" in head and "Example:" in head and f"tpu_scripts/{script}" in head
    assert "set -euo pipefail" in text


@pytest.mark.parametrize("script,env", [("create_tpu.sh", CREATE), ("install.sh", TPU),
                                        ("launch.sh", LAUNCH), ("delete_tpu.sh", TPU),
                                        ("gpu_slurm.sbatch", SLURM)])
def test_missing_variable_is_explained(script, env):
    missing = sorted(env)[0]
    out = _run(script, {k: v for k, v in env.items() if k != missing}, "--dry-run")
    assert out.returncode == 1
    assert f"needs {missing}" in out.stderr and "Example:" in out.stderr
    assert not out.stdout.strip()


@pytest.mark.parametrize("script", ALL)
def test_help_and_unknown_flags(script):
    out = _run(script, {}, "--help")
    assert out.returncode == 0 and "Example:" in out.stdout
    out = _run(script, {}, "--bogus")
    assert out.returncode == 2 and "unknown argument" in out.stderr


def test_create_dry_run(fake_bin):
    out = _run("create_tpu.sh", {**CREATE, "PROJECT": "proj", "SPOT": "1"}, "--dry-run",
               fake_bin=fake_bin)
    assert out.returncode == 0, out.stderr
    assert _commands(out.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "hm", "--zone=us-central2-b",
         "--project=proj"],
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "hm", "--zone=us-central2-b",
         "--project=proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
         "--spot"],
    ]
    assert not fake_bin[1].exists()  # a dry run calls nothing


def test_create_and_delete_are_idempotent(fake_bin):
    bin_dir, log = fake_bin
    out = _run("create_tpu.sh", CREATE, fake_bin=fake_bin, extra_env={"FAKE_DESCRIBE_RC": "0"})
    assert out.returncode == 0 and "already exists" in out.stdout
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["describe"]
    log.unlink()
    out = _run("create_tpu.sh", CREATE, fake_bin=fake_bin, extra_env={"FAKE_DESCRIBE_RC": "1"})
    assert out.returncode == 0
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["describe", "create"]
    log.unlink()
    out = _run("delete_tpu.sh", TPU, fake_bin=fake_bin, extra_env={"FAKE_DESCRIBE_RC": "1"})
    assert out.returncode == 0 and "does not exist" in out.stdout
    log.unlink()
    out = _run("delete_tpu.sh", TPU, fake_bin=fake_bin, extra_env={"FAKE_DESCRIBE_RC": "0"})
    assert [line.split()[3] for line in log.read_text().splitlines()] == ["describe", "delete"]


def test_delete_dry_run():
    out = _run("delete_tpu.sh", TPU, "--dry-run")
    cmds = _commands(out.stdout)
    assert [c[4] for c in cmds] == ["describe", "delete"] and cmds[1][-1] == "--quiet"


def test_install_dry_run_git_url():
    url = "git+https://github.com/org/hypermoe-jax.git@main"
    out = _run("install.sh", {**TPU, "PACKAGE": url, "FETCH_DATA": "1"}, "--dry-run")
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hm", "--worker=all"]
    steps = [shlex.split(s) for s in _option(cmd, "--command").split(" && ")]
    assert steps[0][:5] == ["python3", "-m", "pip", "install", "-U"] and "jax[tpu]" in steps[0]
    assert steps[1] == ["python3", "-m", "pip", "install", "-U", url]
    assert steps[-1] == ["python3", "-m", "hypermoe_jax.data", "fetch", "all"]


def test_install_dry_run_tarball(tmp_path):
    tarball = tmp_path / "hypermoe_jax-0.1.0.tar.gz"
    tarball.write_bytes(b"")
    out = _run("install.sh", {**TPU, "PACKAGE": str(tarball), "JAX_SPEC": "jax[tpu]==0.10.2"},
               "--dry-run")
    scp, ssh = _commands(out.stdout)
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", str(tarball)]
    assert "hm:~/" in scp and "--worker=all" in scp
    remote = _option(ssh, "--command")
    assert "'jax[tpu]==0.10.2'" in remote
    assert "pip install -U ./hypermoe_jax-0.1.0.tar.gz" in remote


def test_launch_dry_run():
    env = {**LAUNCH, "GIN_ARGS": "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption "
                                 "--gin.TRAIN_STEPS=1000",
           "ENV_VARS": "TFDS_DATA_DIR=gs://bucket/tfds"}
    out = _run("launch.sh", env, "--dry-run")
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "hm", "--worker=all"]
    assert shlex.split(_option(cmd, "--command")) == [
        "env", "TFDS_DATA_DIR=gs://bucket/tfds",
        "python3", "-m", "hypermoe_jax.train",
        "--gin_file=models/hypermoe_base_8.gin", "--gin_file=runs/pretrain.gin",
        "--gin.MODEL_DIR=gs://bucket/runs/h8",
        "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption", "--gin.TRAIN_STEPS=1000"]
    out = _run("launch.sh", {**LAUNCH, "LOG_FILE": "/tmp/train.log"}, "--dry-run")
    remote = _option(_commands(out.stdout)[0], "--command")
    assert remote.startswith("nohup python3 -m hypermoe_jax.train ")
    assert remote.endswith("> /tmp/train.log 2>&1 &")


def test_slurm_dry_run_and_process_env():
    out = _run("gpu_slurm.sbatch", SLURM, "--dry-run")
    assert out.returncode == 0, out.stderr
    (cmd,) = _commands(out.stdout)
    assert cmd[:4] == ["srun", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "JAX_COORDINATOR_ADDRESS=gpu007:29500" in _option(cmd, "--export")
    assert "JAX_NUM_PROCESSES=4" in _option(cmd, "--export")
    i = cmd.index("bash")
    wrapper, trainer = cmd[i:i + 4], cmd[i + 4:]
    assert trainer == ["python3", "-m", "hypermoe_jax.train",
                       "--gin_file=models/hypermoe_base_8.gin", "--gin_file=runs/pretrain.gin",
                       "--gin.MODEL_DIR=/shared/h8"]
    # What srun starts on each node: the wrapper sets JAX_PROCESS_ID from SLURM_PROCID.
    probe = ["python3", "-c", "import os; print(os.environ['JAX_PROCESS_ID'])"]
    got = subprocess.run(wrapper + probe, env={"PATH": "/usr/bin:/bin", "SLURM_PROCID": "3"},
                         capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "3"


@pytest.mark.parametrize("nodelist,first", [("node1", "node1"), ("a01,a02", "a01"),
                                            ("gpu[12-15]", "gpu12"), ("x[3,5-6],y", "x3")])
def test_slurm_first_host(nodelist, first):
    out = _run("gpu_slurm.sbatch", {**SLURM, "SLURM_JOB_NODELIST": nodelist,
                                    "COORDINATOR_PORT": "1234"}, "--dry-run")
    assert f"JAX_COORDINATOR_ADDRESS={first}:1234" in out.stdout
