"""Test setup: 8 fake CPU devices (set before jax is imported) and float32 matmuls."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The trainer's persistent compilation cache stays off in tests (in-process runs would turn it on
# for every later test of the worker); tests/train_test.py tests it in a subprocess.
os.environ.setdefault("HYPERMOE_COMPILATION_CACHE", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
assert jax.device_count() == 8, "tests expect 8 fake CPU devices; import jax only after conftest"


def pytest_sessionfinish(session, exitstatus):
    # An empty selection is a failure here, never pytest's "no tests ran" (exit 5).
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("\nerror: no tests were collected; check the test paths and the -k expression.")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
