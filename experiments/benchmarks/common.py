"""Shared pieces of the benchmark suites: timing, the measured matmul peak, the reference MoE config."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import deepseek_jax as dsj

# The 6.5M-parameter MoE config of docs/reference.md's CPU benchmarks (vocab 512, expert width 128, dense 512).
BENCH_MOE = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64, qk_nope_head_dim=32,
    qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
    topk_group=2, n_shared_experts=1, num_nextn_predict_layers=0, rope_scaling=None,
    max_position_embeddings=4096, initializer_range=0.02)


def bench_config(name: str = "bench-6.5m", **overrides) -> dsj.ModelConfig:
  """'bench-6.5m' (the CPU comparison config) or any preset name."""
  if name == "bench-6.5m":
    return dsj.ModelConfig.preset("tiny", **dict(BENCH_MOE, **overrides))
  return dsj.ModelConfig.preset(name, **overrides)


def time_fn(fn, *args, runs: int = 5, warmup: int = 1) -> dict:
  """Median / min wall seconds of fn(*args) (outputs blocked on), after warmup calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return _summary(times)


def interleaved(thunks: dict, runs: int) -> dict:
  """Wall seconds of each thunk over `runs` rounds that call every thunk once, in turn.

  Returns:
    {name: {'median_s', 'min_s', 'runs'}}.
  """
  times = {name: [] for name in thunks}
  for _ in range(runs):
    for name, fn in thunks.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: _summary(t) for name, t in times.items()}


def _summary(times) -> dict:
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "runs": len(times)}


def matmul_peak(n: int | None = None, dtype=jnp.float32, runs: int = 5) -> float:
  """Measured FLOP/s of a large square jnp matmul on the default device."""
  if n is None:
    n = 2048 if jax.default_backend() == "cpu" else 8192
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  t = time_fn(f, a, b, runs=runs)["min_s"]
  return 2 * n ** 3 / t


def machine() -> dict:
  """What the numbers were measured on."""
  return {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()][:2],
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__}
