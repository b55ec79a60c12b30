"""The memory plan against the real train state and the compiled train step; its verdict;
`experiments.costs --config`.

The full-size V3 figures (`python -m experiments.bench --suite=scale`, 2,048 devices) are in docs/scale.md.
"""

import glob
import json
import os
import subprocess
import sys

import pytest

from deepseek_jax.analysis import hardware, memory
from deepseek_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from experiments.benchmarks import scale  # noqa: E402  pylint: disable=g-import-not-at-top

# V3's structure (MLA with q_lora, 1 dense + 2 MoE blocks, sigmoid group-limited routing, MTP) at small widths.
V3_SCALED = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                 first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
                 qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                 moe_intermediate_size=128, max_position_embeddings=4096)
# The GPU's grouped matmul (Pallas, interpret mode here: XLA:CPU's ragged_dot would compute every local expert
# on every row) and the XLA attention (whose kept probabilities the plan counts).
COMMON = dict(scan_layers=True, remat_policy="full", moe_capacity_factor=2.0, moe_impl="pallas",
              attention_impl="xla")
CASES = {
    "small": dict(preset="small", overrides=dict(COMMON, num_hidden_layers=3), precision="bf16",
                  mesh=dict(data=1, fsdp=2, expert=4, tensor=1), batch=16, grad_accum=2, seq_len=256,
                  moment_dtype="bfloat16"),
    "v3_scaled": dict(preset="deepseek-v3", overrides=dict(V3_SCALED, **COMMON), precision="bf16",
                      mesh=dict(data=1, fsdp=2, expert=2, tensor=2), batch=8, grad_accum=1, seq_len=512,
                      moment_dtype="bfloat16"),
    # ZeRO-1 (config.zero1): AdamW moments also split over the data replicas.
    "v3_scaled_zero1": dict(preset="deepseek-v3", overrides=dict(V3_SCALED, **COMMON), precision="bf16",
                            mesh=dict(data=2, fsdp=2, expert=2, tensor=1), batch=8, grad_accum=1,
                            seq_len=512, moment_dtype="float32", zero1=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_state_terms_equal_the_real_state(name):
  """Parameters (with the router's biases) and AdamW moments: the plan's bytes are exactly the sums over the
  train state's per-device shards and dtypes (init_state(abstract_only=True) on 8 host devices, laid out by
  sharding.train_state_sharding as the trainer does)."""
  case = dict(CASES[name], compile=False)
  got = scale._child(case, timeout=600)  # pylint: disable=protected-access
  assert "error" not in got, got
  plan = scale.plan_case(case)
  assert plan["params"] == got["state"]["params"]
  assert plan["router"] == got["state"]["router"]
  assert plan["optimizer"] == got["state"]["moments"]
  # bf16 moments are half the fp32 parameters (ZeRO-1: fp32 moments split over data 2, 1 to 2 x);
  # the fp32 gradient accumulator only with grad_accum > 1.
  if case.get("zero1"):
    assert plan["params"] <= plan["optimizer"] < 2 * plan["params"]
  else:
    assert plan["optimizer"] == plan["params"]
  assert plan["grads"] == plan["params"] * (2 if case["grad_accum"] > 1 else 1)


@pytest.mark.slow
def test_activation_terms_match_the_compiled_step_on_8_devices():
  """Beyond the arguments (gradients, saved activations, one block's backward or the head), the plan is
  within 15% of what XLA allocates for the compiled step, laid out over 8 host devices."""
  # Tokens per device enough for the activations to dominate the vocabulary tables' copies, which the
  # plan counts once for the weights and once for their gradient (docs/scale.md).
  cases = [dict(CASES["small"], batch=16, grad_accum=1, seq_len=1024, compile=True),
           dict(CASES["v3_scaled"], compile=True)]
  env_flags = os.environ.get("XLA_FLAGS", "")
  # LLVM's optimization level changes code, not buffers: the same memory_analysis(), compiled faster.
  os.environ["XLA_FLAGS"] = (env_flags + " --xla_backend_optimization_level=0").strip()
  try:
    results = scale._child(cases, timeout=900)  # pylint: disable=protected-access
  finally:
    os.environ["XLA_FLAGS"] = env_flags
  assert isinstance(results, list), results
  for name, case, compiled in zip(("small", "v3_scaled"), cases, results):
    c = scale.compare(scale.plan_case(case), compiled)
    print(name, json.dumps(c))
    assert abs(c["compiled_argument"] - c["plan_state"] - c["plan_batch"]) < 1e-3 * c["compiled_argument"], c
    assert abs(c["plan_temp"] - c["compiled_temp"]) < 0.15 * c["compiled_temp"], (name, c)
    assert abs(c["total_rel_diff"]) < 0.15, (name, c)


def test_expert_rows_expected_and_bound():
  cfg = ModelConfig.preset("deepseek-v3")
  dropless = memory.expert_rows_per_token(cfg, 64, None)
  assert dropless["expected"] == 8 and dropless["bound"] == 64 * 4 and "dropless" in dropless["bound_name"]
  capped = memory.expert_rows_per_token(cfg, 64, 1.25)
  assert capped["expected"] == 8 and capped["bound"] == 10 and "capacity" in capped["bound_name"]


def test_verdict_fits_and_does_not_fit(tiny_cfg):
  fits = memory.memory_plan(tiny_cfg, {}, batch_size=2, seq_len=64, hbm_gb=80)
  assert fits["verdict"] == f"fits in 80 GB with {(80e9 - fits['total']) / 1e9:,.1f} GB to spare"
  big = memory.memory_plan(tiny_cfg.replace(vocab_size=200_000), {}, batch_size=512, seq_len=1024,
                           hbm_gb=hardware.get_gpu("H100").hbm_gb)
  assert big["total"] > 80e9
  name, size = max(big["terms"].items(), key=lambda kv: kv[1])
  assert name == "logits and their gradient"
  assert big["verdict"] == (f"does not fit in 80 GB: needs {big['total'] / 1e9:,.1f} GB; largest term is "
                            f"{name} ({size / 1e9:,.1f} GB)")


def test_grad_accumulation_and_moment_dtype(tiny_cfg):
  one = memory.memory_plan(tiny_cfg, {}, batch_size=8, seq_len=64)
  four = memory.memory_plan(tiny_cfg, {}, batch_size=8, seq_len=64, grad_accum=4, moment_dtype="bfloat16")
  assert four["tokens_per_device"] == one["tokens_per_device"] / 4
  assert four["grads"] == one["grads"] + one["params"]         # + the fp32 accumulator
  assert four["optimizer"] == one["optimizer"] // 2
  with pytest.raises(ValueError, match="grad_accum=3"):
    memory.memory_plan(tiny_cfg, {}, batch_size=8, seq_len=64, grad_accum=3)


def _costs(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.costs", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)


_EVERY_CONFIG = """
import contextlib, io, json, sys
from absl import flags
from experiments import costs
out = {}
for path in sys.argv[1:]:
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["costs", "--config=" + path, "--format=json"])
  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    costs.main(["costs"])
  out[path] = json.loads(buf.getvalue())
print(json.dumps({p: {"params_total": r["params_total"], "memory": {k: v for k, v in r["memory"].items()
                  if k in ("total", "verdict", "devices", "grad_accum", "microbatch")}} for p, r in out.items()}))
"""


def test_costs_runs_every_experiment_config():
  """`experiments.costs --config=F` for every F in experiments/configs (their main, one process): a cost
  report and a memory plan with a verdict; the V3 recipe fits 80 GB on 2,048 GPUs at the report's batch."""
  paths = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.py")))
  assert len(paths) >= 4
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, "-c", _EVERY_CONFIG, *paths], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(proc.stdout.strip().splitlines()[-1])
  for path in paths:
    r = results[path]
    assert r["params_total"] > 0 and r["memory"]["total"] > 0 and r["memory"]["verdict"], path
  v3 = results[os.path.join(ROOT, "experiments", "configs", "v3.py")]["memory"]
  assert v3["verdict"].startswith("fits in 80 GB"), v3["verdict"]
  assert v3["devices"] == 2048 and v3["grad_accum"] * v3["microbatch"] == 15360


def test_costs_bad_input_is_one_line():
  proc = _costs("--preset=deepseek-v3", "--mesh=pipeline:16")
  assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
  assert "pipeline:16" in proc.stderr
