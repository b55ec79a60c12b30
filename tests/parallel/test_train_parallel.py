"""The train command on an 8-device mesh (data x fsdp x expert, and with tensor) logs the losses of the
single-device run, and lays the train state out by the logical-axis rules (read back from its checkpoint)."""

import base64
import binascii
import json
import os
import subprocess
import sys
import tempfile

import pytest

from tests.parallel.conftest import ROOT, worker_env

STEPS = 3
# A micro experiment (one dense and one MoE layer with 8 routed experts, MTP depth 1, 2 heads), 8 rows of
# 16 tokens (one row per device on 8), constant schedules, nothing but the losses logged.
MICRO = {
    "model.hidden_size": 32, "model.num_hidden_layers": 2, "model.num_attention_heads": 2,
    "model.intermediate_size": 64, "model.moe_intermediate_size": 16, "model.q_lora_rank": 16,
    "model.kv_lora_rank": 16, "model.qk_nope_head_dim": 8, "model.qk_rope_head_dim": 8,
    "model.v_head_dim": 8, "batch_size": 8, "seq_len": 16, "steps": STEPS, "eval_every": 0,
    "sample.num": 0, "progress": False, "log_every": 1, "checkpoint_every": 0, "optimizer.lr": 3e-3,
    "optimizer.warmup_fraction": 0.0, "balance.gamma": 0.01,
}
LAYOUTS = {
    "single": (1, {}),
    "data2_fsdp2_expert2": (8, {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}),
    "fsdp2_expert2_tensor2": (8, {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}),
    # ZeRO-1: the AdamW moments also split over the data replicas, the parameters not.
    "data4_fsdp2_zero1": (8, {"data": 4, "fsdp": 2, "expert": 1, "tensor": 1, "zero1": True}),
}
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"deepseek_jax_test_cache_{os.getuid()}")


def _train(workdir, devices, mesh):
  flags = [f"--config.{k}={v}" for k, v in MICRO.items()]
  flags += [f"--config.mesh.{k}={v}" if k != "zero1" else f"--config.zero1={v}" for k, v in mesh.items()]
  env = worker_env(devices)
  # Compilation dominates these micro runs: XLA:CPU at optimization level 0 (all layouts alike).
  env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
  env.update(JAX_COMPILATION_CACHE_DIR=CACHE_DIR, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  cmd = [sys.executable, "-m", "experiments.train", "--config=experiments/configs/tiny.py",
         f"--workdir={workdir}", *flags]
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    recs = [json.loads(line) for line in f if line.strip()]
  return [r["loss"] for r in recs if "loss" in r]


def _saved_specs(workdir) -> dict:
  """{array path: PartitionSpec entries} that orbax recorded for the last checkpoint's state."""
  with open(os.path.join(workdir, "checkpoints", str(STEPS), "state", "_sharding")) as f:
    table = json.load(f)
  out = {}
  for key, value in table.items():
    try:  # orbax stores the '.'-joined path base64-encoded
      key = base64.b64decode(key, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
      pass
    value = json.loads(value) if isinstance(value, str) else value
    out[key] = [tuple(e) if isinstance(e, list) else e for e in value["partition_spec"]]
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = {}
  for name, (devices, mesh) in LAYOUTS.items():
    wd = str(tmp_path_factory.mktemp(name))
    out[name] = (wd, _train(wd, devices, mesh))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["data2_fsdp2_expert2", "fsdp2_expert2_tensor2", "data4_fsdp2_zero1"])
def test_sharded_cli_run_matches_single_device(runs, layout):
  ref = runs["single"][1]
  got = runs[layout][1]
  assert len(ref) == len(got) == STEPS
  rel = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
  print(f"{layout}: losses {got} vs {ref}, max relative difference {rel:.2e}")
  assert rel < 1e-5, (got, ref)
  assert ref[-1] < ref[0]  # the steps train: a mismatch would show


@pytest.mark.slow
def test_sharded_cli_run_lays_out_state_by_rules(runs):
  want = {  # (layout, array) -> spec; parameters and AdamW moments alike (FSDP), experts over 'expert'
      ("data2_fsdp2_expert2", "params.layers_1.mlp.experts.gate_proj"): ["expert", "fsdp", None],
      ("data2_fsdp2_expert2", "opt_state.1.mu.layers_1.mlp.experts.down_proj"): ["expert", None, "fsdp"],
      ("data2_fsdp2_expert2", "params.embed_tokens.embedding"): [None, "fsdp"],
      ("fsdp2_expert2_tensor2", "params.layers_1.mlp.experts.gate_proj"): ["expert", "fsdp", "tensor"],
      ("fsdp2_expert2_tensor2", "params.layers_0.self_attn.o_proj.kernel"): ["tensor", None, "fsdp"],
      ("fsdp2_expert2_tensor2", "params.lm_head.kernel"): ["fsdp", None],  # vocab 259: odd
      # ZeRO-1: moments take 'data' on their first whole dim that it divides; parameters stay replicated
      # over it.
      ("data4_fsdp2_zero1", "params.layers_1.mlp.experts.gate_proj"): [None, "fsdp", None],
      ("data4_fsdp2_zero1", "opt_state.1.mu.layers_1.mlp.experts.gate_proj"): ["data", "fsdp", None],
      ("data4_fsdp2_zero1", "opt_state.1.nu.layers_1.mlp.experts.down_proj"): ["data", None, "fsdp"],
  }
  specs = {name: _saved_specs(runs[name][0])
           for name in ("data2_fsdp2_expert2", "fsdp2_expert2_tensor2", "data4_fsdp2_zero1")}
  for (layout, path), spec in want.items():
    got = specs[layout].get(path)
    assert got is not None, (layout, path, sorted(specs[layout])[:20])
    assert list(got) + [None] * (len(spec) - len(got)) == spec, (layout, path, got)
  assert specs["data2_fsdp2_expert2"]["step"] == []


def test_fit_spec_keeps_the_dividing_axes():
  from jax.sharding import PartitionSpec as P
  from deepseek_jax.sharding import fit_spec

  class Mesh:  # fit_spec reads only the axis sizes
    shape = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}

  # 4 rows over data x fsdp x expert (8): data x fsdp (4) divide, expert would not -> dropped, not all.
  assert fit_spec(P(("data", "fsdp", "expert")), (4, 3), Mesh) == P(("data", "fsdp"), None)
  # 6 over data x fsdp: data divides, data x fsdp = 4 does not; fsdp is kept only with what came before.
  assert fit_spec(P(("data", "fsdp"), "expert"), (6, 3), Mesh) == P("data", None)
  # A size-1 or absent axis is dropped; 3 heads do not split over 2.
  assert fit_spec(P("tensor", "fsdp", "nope"), (8, 3, 4), Mesh) == P(None, None, None)
  assert fit_spec(P(None, ("expert", "data")), (5, 8), Mesh) == P(None, ("expert", "data"))
