"""A GRPO update on a data x fsdp x expert mesh of 8 CPU devices equals the single-device update."""

import os
import subprocess
import sys

import json

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sharded_equals_unsharded():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  r = subprocess.run([sys.executable, "-m", "tests.posttrain.sharded_worker"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  for name, (single, sharded) in out["metrics"].items():
    assert abs(single - sharded) <= 1e-5 * max(1.0, abs(single)), (name, single, sharded)
  assert out["update"] > 1e-4                       # the step moved the parameters (lr 1e-3)
  assert out["params"] < 1e-5 and out["router"] < 1e-6     # 1% of one Adam step
  assert any("expert" in s for s in out["specs"]) and any("fsdp" in s for s in out["specs"])
