"""The compile benchmark's abstract train step: lowers without allocating a parameter."""

import jax

from experiments.benchmarks import compile as compile_bench
from experiments.benchmarks.common import bench_config


def test_abstract_step_lowers_without_arrays():
  cfg = bench_config("tiny")
  step, state, batch = compile_bench.abstract_step(cfg, batch=2, seq_len=16)
  leaves = jax.tree.leaves(state)
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  assert batch["inputs"].shape == (2, 16)
  out = compile_bench.time_compile(cfg, batch=2, seq_len=16, compile_too=False)
  assert out["layers"] == cfg.num_hidden_layers and out["lower_s"] > 0 and "compile_s" not in out
  text = step.lower(state, batch).as_text()
  assert "func.func public @main" in text


def test_compiled_step_reports_its_temporaries():
  out = compile_bench.time_compile(bench_config("tiny"), batch=2, seq_len=16)
  assert out["compile_s"] > 0 and out["temp_bytes"] > 0
