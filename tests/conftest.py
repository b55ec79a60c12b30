"""Shared fixtures: CPU backend, float32 matmuls at full precision, XLA:CPU at optimization level 0."""

import importlib.util
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _cuda_plugin_installed() -> bool:
  for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
    try:
      if importlib.util.find_spec(name) is not None:
        return True
    except ImportError:
      pass
  return False


# Compilation dominates the suite (small shapes, few steps). Optimization level 0 skips LLVM's passes and
# compiles about three times faster. The optimized HLO is the same at either level (LLVM's code may round
# differently in the last bits), and every run a test compares is compiled alike (subprocesses inherit the
# flag). Not where a CUDA plugin is installed: the CUDA compile check (tests/gpu) reports the GPU code as XLA
# builds it by default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "") and not _cuda_plugin_installed():
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def tiny_cfg():
  import deepseek_jax as dsj
  return dsj.ModelConfig.preset("tiny")
