"""Every Pallas kernel at DeepSeek-V3 shapes and the GPU train step compile for H100/H200 (sm_90a).

Runs where a jax CUDA plugin is importable (the environment `.ci/cuda_env.sh` builds; no GPU needed) and
skips elsewhere. Each case is lowered for CUDA once; its kernels must verify, compile to PTX and fit
Hopper's shared memory; bf16 kernels must not spill; under jax 0.11, which exposes no Triton compiler to
Python, every case must compile whole with XLA for an H100 (docs/gpu.md).
"""

import os

import pytest

from deepseek_jax.analysis import cuda_compile as cc

AVAILABLE, WHY = cc.cuda_plugin_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=WHY)

if AVAILABLE:
  from experiments.benchmarks import cuda_compile as suite
  # DSJ_CUDA_CHECK_CASES: 'all' (default), 'kernels', 'train' or 'quick' (experiments/benchmarks/cuda_compile.py).
  CASES = {f"{c.name} {c.dtype}": c
           for c in suite.all_cases(os.environ.get("DSJ_CUDA_CHECK_CASES", "all"))}
else:
  CASES = {}

_TOOLS = {}


def _tools():
  if not _TOOLS:
    _TOOLS["compiler"], _TOOLS["ptxas"] = cc.triton_compiler(), cc.find_ptxas()
  return _TOOLS["compiler"], _TOOLS["ptxas"]


@pytest.mark.parametrize("key", sorted(CASES) or ["no cases"])
def test_case_compiles_within_hopper_limits(key):
  compiler, ptxas = _tools()
  row = suite.run_case(CASES[key], compiler, ptxas,
                       whole_program=suite.whole_program(CASES[key], compiler))
  print(suite.format_rows([row]))
  assert not row["error"], row["error"]
  assert row["kernels"], f"{key}: no Pallas kernel found in the lowered program"
  for k in row["kernels"]:
    assert k["verified"], f"{key} {k['name']}: {k['error']}"
    assert k["compiled"] is not False, f"{key} {k['name']}: {k['error']}"
    assert not k["error"], f"{key} {k['name']}: {k['error']}"
    if k["smem_bytes"] is not None:
      assert k["smem_bytes"] <= cc.SMEM_LIMIT, f"{key} {k['name']}: {k['smem_bytes']} B smem"
    if k["registers"] is not None:
      assert k["registers"] <= cc.REGISTER_LIMIT
    if CASES[key].dtype == "bfloat16" and k["spill_bytes"] is not None:
      assert k["spill_bytes"] == 0, f"{key} {k['name']}: spills {k['spill_bytes']} B"


def test_compiler_present_under_jax_010():
  """jax 0.10's CUDA plugin exposes the Triton compiler; the check must have used it there."""
  import jax  # pylint: disable=g-import-not-at-top
  compiler, ptxas = _tools()
  if jax.__version_info__[:2] == (0, 10):
    assert compiler is not None and ptxas, "jax 0.10 with its CUDA plugin: compiler or ptxas missing"
