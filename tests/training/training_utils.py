"""Helpers for the training tests: a micro experiment (2 layers, width 32) with flat schedules."""

import os
import subprocess
import sys
import tempfile

CACHE_DIR = os.path.join(tempfile.gettempdir(), f"deepseek_jax_test_cache_{os.getuid()}")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A shrunken tiny experiment: one dense and one MoE layer, MTP depth 1, constant schedules (so that a run
# of N steps followed by one of 2N steps sees the same hyperparameters as one run of 2N steps).
MICRO = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
    "model.intermediate_size": 64, "model.moe_intermediate_size": 16, "model.q_lora_rank": 16,
    "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 8,
    "model.v_head_dim": 8, "batch_size": 8, "seq_len": 32, "eval_every": 0, "sample.num": 0,
    "progress": False, "log_every": 1, "checkpoint_every": 4, "optimizer.lr": 3e-3,
    "optimizer.warmup_fraction": 0.0, "optimizer.constant_until": 1.0, "optimizer.cosine_until": 1.0,
    "optimizer.tail_until": 1.0, "mtp.switch_fraction": 1.0, "balance.gamma_until": 1.0,
}


def fast_compile_flags(xla_flags: str = "") -> str:
  """`xla_flags` plus the XLA:CPU backend at optimization level 0.

  Compilation dominates these micro runs (a few steps of a 2-layer model); level 0 skips LLVM's
  optimization passes, which roughly halves it. Every run a test compares is started with the same flags.
  """
  return f"{xla_flags} --xla_backend_optimization_level=0".strip()


def micro_config(**overrides):
  """The micro experiment as a ConfigDict (tiny.py with MICRO and `overrides`, dots as '__')."""
  sys.path.insert(0, ROOT)
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  items = dict(MICRO)
  items.update({k.replace("__", "."): v for k, v in overrides.items()})
  for key, value in items.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def micro_flags(**overrides):
  """The micro experiment as --config.X=V flags."""
  items = dict(MICRO)
  items.update({k.replace("__", "."): v for k, v in overrides.items()})
  return [f"--config.{k}={v}" for k, v in items.items()]


def run_train(workdir, *flags, env=None, wait=True, timeout=300):
  """Runs `python -m experiments.train` on the tiny config in a subprocess."""
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
         f"--workdir={workdir}", *flags]
  # A shared persistent compilation cache: runs of the same experiment compile once.
  full_env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  full_env.update(env or {})
  full_env["XLA_FLAGS"] = fast_compile_flags(full_env.get("XLA_FLAGS", ""))
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)

