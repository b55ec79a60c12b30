"""The Pallas kernels as the GPU runs them, under a mesh: each device runs them on its own shard
(`deepseek_jax.ops.per_shard`) and the model gives the single-device values (interpret mode on CPU)."""

import pytest


@pytest.mark.slow
def test_pallas_kernels_run_per_device_and_match_one_device(script):
  # Attention and experts (Pallas) on data 2 x fsdp 2 x tensor 2: no expert axis, so the grouped matmul runs
  # on each device's tokens.
  r = script("model_worker", "kernels")
  assert r["logits"] < 1e-5 and r["grad_max"] < 1e-5 and r["tpe"] == 0.0, r
  # FP8 GEMMs under the mesh: the weight gradient is summed per device, then over the token axes.
  assert r["fp8_dx"] < 1e-6 and r["fp8_dw"] < 1e-5, r
