"""`--suite=compile`: trace, lower and compile time of the train step with abstract inputs.

Nothing is allocated: the state comes from `jax.eval_shape` of init + optimizer, the batch is a
ShapeDtypeStruct, so the V3-shaped model (671B parameters) lowers on a laptop.  Both layer layouts run in
the same process:
- unrolled (the default): trace / lower / compile time grows linearly in depth, so the suite compiles the
  preset at a few depths (`--compile_layers`, default first_k_dense + 1 and twice that), lowers it at full
  depth, and extrapolates compile time to full depth from the per-layer slope;
- scanned (`ModelConfig.scan_layers`): one block per run of identical layers, compiled at the same depths
  and at full depth.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax import DeepSeekV3
from deepseek_jax.training.optimizer import Schedules, make_optimizer
from deepseek_jax.training.state import create_state
from deepseek_jax.training.step import make_train_step
from experiments.benchmarks.common import bench_config, machine


def abstract_step(cfg, batch: int, seq_len: int):
  """(jitted step, abstract state, abstract batch) of the train step for cfg; nothing allocated."""
  model = DeepSeekV3(cfg)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)

  def make_state(rng):
    variables = model.init(rng, jnp.zeros((1, 8), jnp.int32))
    return create_state(variables, make_optimizer(variables["params"]), rng)

  state = jax.eval_shape(make_state, jax.random.PRNGKey(0))
  tx = make_optimizer(state.params)
  step = make_train_step(model, tx, Schedules(steps=1000, lr=1e-3), alpha=1e-4, donate=True)
  return step, state, {"inputs": tokens, "targets": tokens}


def time_compile(cfg, batch: int, seq_len: int, compile_too: bool = True) -> dict:
  """Seconds to trace + lower and (optionally) to compile the train step of cfg, with the compiled step's
  XLA temporary bytes (activations, residuals, workspace: `temp_bytes`) when compiled."""
  t0 = time.perf_counter()
  step, state, data = abstract_step(cfg, batch, seq_len)
  lowered = step.lower(state, data)
  out = {"layers": cfg.num_hidden_layers, "lower_s": time.perf_counter() - t0}
  if compile_too:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    out["compile_s"] = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    if memory is not None:
      out["temp_bytes"] = int(memory.temp_size_in_bytes)
  return out


def _depth_rows(base, preset, depths, batch, seq_len, label):
  rows = []
  for layers in depths:
    cfg = bench_config(preset, num_hidden_layers=layers, scan_layers=base.scan_layers,
                       first_k_dense_replace=min(base.first_k_dense_replace, layers - 1))
    rows.append(time_compile(cfg, batch, seq_len))
    print(f"[compile] {preset} {label} {layers} layers: {rows[-1]}", flush=True)
  return rows


def _slope(rows, full_layers) -> dict:
  if len(rows) < 2:
    return {}
  x = np.array([r["layers"] for r in rows], float)
  y = np.array([r["compile_s"] for r in rows], float)
  slope, intercept = np.polyfit(x, y, 1)
  return {"compile_s_per_layer": float(slope),
          "compile_s_full_depth_extrapolated": float(intercept + slope * full_layers)}


def run(flags) -> dict:
  """Runs the suite; see the module docstring."""
  preset = getattr(flags, "preset", "") or "deepseek-v3"
  batch = getattr(flags, "batch", 0) or 1
  seq_len = getattr(flags, "seq_len", 0) or 512
  base = bench_config(preset, scan_layers=False)
  depths = [int(d) for d in (getattr(flags, "compile_layers", "") or "").split(",") if d]
  if not depths:
    first = base.first_k_dense_replace
    depths = [first + 1, 2 * (first + 1)]
  rows = _depth_rows(base, preset, depths, batch, seq_len, "unrolled")
  full = time_compile(base, batch, seq_len, compile_too=False)
  print(f"[compile] {preset} unrolled {base.num_hidden_layers} layers (lower only): {full}", flush=True)
  result = {"suite": "compile", "machine": machine(), "config": preset, "batch": batch, "seq_len": seq_len,
            "rows": rows, "full_depth": full, **_slope(rows, base.num_hidden_layers)}
  scanned = dataclasses.replace(base, scan_layers=True)
  scan_rows = _depth_rows(scanned, preset, depths, batch, seq_len, "scanned")
  scan_full = time_compile(scanned, batch, seq_len)
  print(f"[compile] {preset} scanned {base.num_hidden_layers} layers: {scan_full}", flush=True)
  result["scan_layers"] = {"rows": scan_rows, "full_depth": scan_full,
                           **_slope(scan_rows, base.num_hidden_layers)}
  if "compile_s_full_depth_extrapolated" in result:
    unrolled_total = result["compile_s_full_depth_extrapolated"] + full["lower_s"]
    result["scan_layers"]["full_depth_speedup"] = unrolled_total / (scan_full["lower_s"]
                                                                     + scan_full["compile_s"])
  return result
