"""Runs multi-device checks in subprocesses so that the rest of the suite keeps one CPU device."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_env(devices: int) -> dict:
  """The environment of a worker with `devices` host CPU devices.

  XLA:CPU runs at optimization level 0: compilation dominates these few-step runs, and level 0 skips LLVM's
  optimization passes. Every run a test compares is started with the same flags.
  """
  e = dict(os.environ)
  e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
           JAX_PLATFORMS="cpu")
  return e


def run_script(module: str, *args: str, devices: int = 8, timeout: int = 600) -> dict:
  """Runs `python -m tests.parallel.<module> args...` with `devices` host CPU devices; returns its JSON."""
  proc = subprocess.run([sys.executable, "-m", f"tests.parallel.{module}", *args], cwd=ROOT,
                        env=worker_env(devices), capture_output=True, text=True, timeout=timeout,
                        check=False)
  if proc.returncode:
    raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def script():
  return run_script


@pytest.fixture(scope="session")
def layouts(tmp_path_factory):
  """The model on each 8-device layout vs one device (one subprocess shared by the tests that read it)."""
  path = str(tmp_path_factory.mktemp("layouts") / "data2_fsdp2_expert2.npz")
  result = run_script("model_worker", "layouts", path)
  result["npz"] = path
  return result
