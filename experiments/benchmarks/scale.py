"""`--suite=scale`: the compiled train step's per-device memory next to the memory plan, on a simulated mesh.

The train step (`training.step.make_train_step`: loss + grads + AdamW, scanned layers) of a model is lowered
and compiled with abstract inputs (the train state from `init_state(abstract_only=True)`, the batch as
ShapeDtypeStructs, both laid out by `sharding.train_state_sharding` / `sharding.data_sharding`), so nothing
is allocated, on XLA's host platform with a forced device count: with as many host devices as the plan's
mesh has, every per-device shape is the plan's own.  `compiled.memory_analysis()` gives the per-device
argument, output, alias and temporary bytes; `analysis.memory.memory_plan` of the same run is printed beside
them.

With `--target=h100` (run from a CUDA-plugin environment, `.ci/cuda_env.sh`) the devices are compile-only
H100s of the CUDA plugin (`analysis.cuda_compile.h100_devices`) and XLA's GPU compiler compiles the step as
the GPUs would run it: the Pallas kernels compiled, the FP8 recipe on FP8 dots; no GPU is needed.

Each case compiles in a child process (the host device count is fixed when XLA starts):

    python -m experiments.bench --suite=scale                     # the V3 recipe of experiments/configs/v3.py
    python -m experiments.bench --suite=scale --small             # V3 widths at 8 layers on 8 devices
    python -m experiments.bench --suite=scale --preset=small --mesh=fsdp:2,expert:4 --batch=8 --seq_len=512

(`--preset`, `--mesh`, `--batch` (sequences of one step, without accumulation), `--seq_len`, `--remat`
override the case; `--dtype` picks the recipes compiled, e.g. 'bf16,fp8'.)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _v3_case() -> dict:
  """The run of experiments/configs/v3.py, as a case."""
  sys.path.insert(0, REPO)
  from experiments.configs import v3  # pylint: disable=g-import-not-at-top
  c = v3.get_config()
  mesh = {k: int(v) for k, v in c.mesh.items()}
  overrides = {k: v for k, v in c.model.to_dict().items() if v is not None}
  # The experts' grouped matmul the GPU runs ('auto' there), here in Pallas interpret mode: XLA:CPU's
  # ragged_dot computes every local expert on every received row. The attention is XLA's (its probabilities
  # are kept; the plan counts them): the flash kernel's interpret mode allocates far more than the GPU would.
  overrides.update(moe_impl="pallas", attention_impl="xla")
  return dict(preset="deepseek-v3", overrides=overrides, precision=c.precision,
              mesh=mesh, batch=int(c.batch_size), grad_accum=int(c.grad_accum), seq_len=int(c.seq_len),
              moment_dtype=c.optimizer.mu_dtype)


def cases(flags) -> list[dict]:
  """The cases the flags ask for (module docstring)."""
  from deepseek_jax.analysis.memory import parse_mesh  # pylint: disable=g-import-not-at-top
  base = _v3_case()
  if getattr(flags, "small", False):
    # V3's widths, 8 layers (3 dense + 5 MoE) on 8 devices: expert=4 with E = 16 keeps 4 experts per device.
    base.update(mesh=dict(data=1, fsdp=2, expert=4, tensor=1), batch=8, grad_accum=1, seq_len=1024)
    base["overrides"].update(num_hidden_layers=8, n_routed_experts=16)
  preset = getattr(flags, "preset", "") or ""
  if preset and preset != base["preset"]:
    base.update(preset=preset, overrides={"scan_layers": True, "remat_policy": "full", "moe_impl": "pallas",
                                          "attention_impl": "xla"})
  if getattr(flags, "mesh", ""):
    base["mesh"] = dict(dict(data=1, fsdp=1, expert=1, tensor=1), **parse_mesh(flags.mesh))
  if getattr(flags, "batch", 0):
    base.update(batch=int(flags.batch), grad_accum=1)   # --batch is one microbatch
  if getattr(flags, "seq_len", 0):
    base["seq_len"] = int(flags.seq_len)
  if getattr(flags, "remat", ""):
    base["overrides"]["remat_policy"] = flags.remat
  target = getattr(flags, "target", "") or "cpu"
  if target not in ("cpu", "h100"):
    raise ValueError(f"--target={target!r}: the scale suite compiles for 'cpu' (host devices) or 'h100'")
  base["target"] = target
  if target == "h100":
    # What the GPU runs: the flash attention and grouped matmul kernels, compiled.
    base["overrides"].update(attention_impl="pallas", moe_impl="pallas")
  recipes = [r for r in (getattr(flags, "dtype", "") or "bf16,fp8").split(",") if r]
  out = []
  for r in recipes:
    if r not in ("fp32", "bf16", "fp8"):
      raise ValueError(f"--dtype entry {r!r}: the scale suite compiles precision recipes fp32, bf16, fp8")
    out.append(dict(base, precision=r, overrides=dict(base["overrides"])))
  return out


def model_config_of(case: dict):
  """The ModelConfig of a case (the experiment config's rules: `training.config.model_config`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.config import default_config, model_config  # pylint: disable=g-import-not-at-top
  c = default_config()
  c.model.preset = case["preset"]
  for k, v in case["overrides"].items():
    if k != "preset" and v is not None:
      c.model[k] = v
  c.precision = case["precision"]
  del ml_collections
  return model_config(c)


def compile_case(case: dict) -> dict:
  """Lowers and compiles the case's train step on this process's devices; per-device bytes and times (with
  `case['compile']` False: only the abstract train state's per-device bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from deepseek_jax import sharding  # pylint: disable=g-import-not-at-top
  from deepseek_jax.analysis import cuda_compile  # pylint: disable=g-import-not-at-top
  from deepseek_jax.model import DeepSeekV3  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.optimizer import Schedules, make_optimizer  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.state import init_state  # pylint: disable=g-import-not-at-top
  from deepseek_jax.training.step import make_train_step  # pylint: disable=g-import-not-at-top
  from kernels._common import target_backend  # pylint: disable=g-import-not-at-top

  cfg = model_config_of(case)
  h100 = case.get("target") == "h100"
  devices = cuda_compile.h100_devices(math.prod(case["mesh"].values())) if h100 else None
  mesh = sharding.make_mesh(**case["mesh"], devices=devices)
  model = DeepSeekV3(cfg)
  tx_factory = lambda p: make_optimizer(p, mu_dtype=case["moment_dtype"])
  t0 = time.perf_counter()
  # As the trainer does: the state's shardings from the rules, then everything else under the mesh.
  sharding_fn = sharding.train_state_sharding(model, mesh, zero1_axes=sharding.ZERO1_AXES if case.get("zero1") else ())
  batch_sharding = sharding.data_sharding(mesh)
  # The abstract state is made before the mesh is entered: its eager key split runs on this host (the
  # compile-only devices run nothing).
  state, tx, shardings = init_state(model, tx_factory, jax.random.PRNGKey(0), case["seq_len"], sharding_fn,
                                    abstract_only=True)
  if not case.get("compile", True):
    return {"devices": int(mesh.size), "state": state_bytes(state)}
  with contextlib.ExitStack() as stack:
    if h100:
      stack.enter_context(target_backend("gpu"))
      stack.enter_context(cuda_compile.hopper_target())
    stack.enter_context(sharding.use_mesh(mesh))
    step = make_train_step(model, tx, Schedules(steps=1000), alpha=1e-4, grad_accum=case["grad_accum"],
                           state_sharding=shardings, batch_sharding=batch_sharding)
    tokens = jax.ShapeDtypeStruct((case["batch"], case["seq_len"]), jnp.int32, sharding=batch_sharding)
    lowered = step.lower(state, {"inputs": tokens, "targets": tokens})
  lower_s = time.perf_counter() - t0
  print(f"[scale] lowered in {lower_s:.1f} s; compiling on {mesh.size} devices", file=sys.stderr, flush=True)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  m = compiled.memory_analysis()
  out = dict(devices=int(mesh.size), lower_s=lower_s, compile_s=compile_s,
             argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
             alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes),
             generated_code=int(m.generated_code_size_in_bytes))
  # Live at the peak: the arguments (the donated state is reused for the output), outputs not aliased to
  # them, and the temporaries.
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  out["state"] = state_bytes(state)
  return out


def state_bytes(state) -> dict:
  """Per-device bytes of an abstract train state's parts, from each leaf's sharding and dtype."""
  import jax  # pylint: disable=g-import-not-at-top

  def per_device(tree):
    total = 0
    for leaf in jax.tree.leaves(tree):
      shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
      total += math.prod(shape) * leaf.dtype.itemsize
    return int(total)

  opt = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu") and hasattr(x, "nu"))
  moments = sum(per_device((o.mu, o.nu)) for o in opt if hasattr(o, "mu"))
  return dict(params=per_device(state.params), router=per_device(state.router), moments=moments,
              opt_state=per_device(state.opt_state),
              other=per_device((state.step, state.rng, state.skipped, state.bad_streak)))


def plan_case(case: dict) -> dict:
  """`memory_plan` of the case."""
  from deepseek_jax.analysis import memory  # pylint: disable=g-import-not-at-top
  from deepseek_jax.sharding import ZERO1_AXES  # pylint: disable=g-import-not-at-top
  cfg = model_config_of(case)
  return memory.memory_plan(cfg, case["mesh"], batch_size=case["batch"], seq_len=case["seq_len"],
                            grad_accum=case["grad_accum"], moment_dtype=case["moment_dtype"],
                            zero1_axes=ZERO1_AXES if case.get("zero1") else (),
                            attention_impl="pallas" if cfg.attention_impl == "pallas" else "xla",
                            dispatch="ragged" if case.get("target") == "h100" else "padded")


def _child(case, timeout: float):
  """compile_case(case) (or of each case of a list, same device count) in a child process."""
  devices = math.prod((case[0] if isinstance(case, list) else case)["mesh"].values())
  target = (case[0] if isinstance(case, list) else case).get("target")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if target != "h100":
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
  proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.scale", json.dumps(case)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)
  sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "")
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(plan: dict, compiled: dict) -> dict:
  """Plan terms next to the compiler's; the relative difference of the totals."""
  state = plan["params"] + plan["optimizer"] + plan["router"]
  return dict(
      plan_state=state, compiled_argument=compiled["argument"],
      plan_batch=plan["batch_inputs"],
      plan_temp=plan["total"] - state - plan["batch_inputs"], compiled_temp=compiled["temp"],
      plan_total=plan["total"], compiled_total=compiled["total"],
      total_rel_diff=(plan["total"] - compiled["total"]) / compiled["total"])


def run(flags) -> dict:
  """Runs the suite; see the module docstring."""
  from experiments.benchmarks.common import machine  # pylint: disable=g-import-not-at-top
  rows = []
  for case in cases(flags):
    devices = math.prod(case["mesh"].values())
    print(f"[scale] {case['preset']} {case['precision']} mesh {case['mesh']} batch {case['batch']} x "
          f"{case['seq_len']} (grad_accum {case['grad_accum']}) on {devices} host devices", flush=True)
    t0 = time.perf_counter()
    compiled = _child(case, timeout=3600)
    wall = time.perf_counter() - t0
    plan = plan_case(case)
    row = dict(case=case, wall_s=wall, compiled=compiled, plan={k: v for k, v in plan.items()
                                                                  if isinstance(v, (int, float, str))})
    if "error" not in compiled:
      row["comparison"] = compare(plan, compiled)
    print(f"[scale] {json.dumps(row.get('comparison', compiled))}", flush=True)
    rows.append(row)
  return {"suite": "scale", "machine": machine(), "rows": rows}


if __name__ == "__main__":
  # One case, or a list of cases on the same device count (one JSON result each, in order).
  arg = json.loads(sys.argv[1])
  print(json.dumps([compile_case(c) for c in arg] if isinstance(arg, list) else compile_case(arg)))
