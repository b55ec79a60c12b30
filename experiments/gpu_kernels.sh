#!/usr/bin/env bash
# Kernel checks on one H100/H200, under 5.5 minutes (with experiments/gpu_train.sh after it, under 8):
#   1. the kernel tests compiled through Triton (every test calls the kernels with interpret=None);
#   2. the kernel benchmark on DeepSeek-V3 shapes against XLA's counterparts ("$OUT/kernels.json");
#   3. each kernel's time against its roofline on this GPU (datasheet bf16 dense peak and HBM bandwidth),
#      and tokamax's ragged_dot beside gmm where tokamax is installed, values checked against
#      gmm_reference ("$OUT/roofline.json").
# Usage, from anywhere: OUT=/some/dir bash experiments/gpu_kernels.sh
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" gpu_kernels

tests_rc=0
timeout 120 "$PY" -m pytest tests/kernels -q -s -p no:cacheprovider -k "not host" 2>&1 \
  | tee "$OUT/kernel_tests.log" || tests_rc=$?

timeout 150 "$PY" -m experiments.bench --suite=kernels --json="$OUT/kernels.json" 2>&1 \
  | tee "$OUT/bench.log" || true

timeout 45 "$PY" - "$OUT" <<'PY' 2>&1 | tee "$OUT/roofline.log" || true
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
out = sys.argv[1]
kind = jax.devices()[0].device_kind
# Datasheet dense bf16 peak (TFLOP/s) and HBM bandwidth (TB/s).
peak, bw = (989.4, 4.8) if "H200" in kind else (989.4, 3.35)
rows = []
try:
  bench = json.load(open(os.path.join(out, "kernels.json")))
  for case in bench.get("results", []):
    if not isinstance(case, dict) or not case.get("kernel_ms"):
      continue
    floor_ms = max(case["gflop"] / peak, case["gbyte"] / bw)      # GFLOP / (TFLOP/s) = ms
    rows.append(dict(name=case["name"], kernel_ms=case["kernel_ms"], roofline_ms=floor_ms,
                     fraction_of_roofline=floor_ms / case["kernel_ms"]))
except Exception as e:  # the benchmark may have failed; keep what the rest measures
  rows.append(dict(error=f"kernels.json: {type(e).__name__}: {e}"))
try:
  from deepseek_jax.ops import tokamax_ragged_dot as trd
  from kernels import grouped_matmul as gm
  if trd.available():
    m, g, k, n = 8192, 32, 7168, 2048
    ks = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w = jax.random.normal(ks[1], (g, k, n), jnp.bfloat16) * 0.02
    sizes = jnp.asarray(np.random.default_rng(0).multinomial(m, np.ones(g) / g), jnp.int32)
    ref = gm.gmm_reference(x, w, sizes).astype(jnp.float32)
    for name, fn in [("gmm", jax.jit(lambda a, b, s: gm.gmm(a, b, s))),
                     ("tokamax_ragged_dot", jax.jit(lambda a, b, s: trd.ragged_dot(a, b, s)))]:
      y = fn(x, w, sizes).block_until_ready()
      err = float(jnp.linalg.norm(y.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
      ts = []
      for _ in range(20):
        t0 = time.perf_counter(); fn(x, w, sizes).block_until_ready(); ts.append(time.perf_counter() - t0)
      ms = float(np.median(ts)) * 1e3
      flops = 2 * m * k * n
      rows.append(dict(name=f"{name} fwd m={m} g={g} k={k} n={n}", kernel_ms=ms, rel_err=err,
                       roofline_ms=flops / 1e9 / peak, fraction_of_roofline=flops / 1e9 / peak / ms))
except Exception as e:
  rows.append(dict(error=f"tokamax comparison: {type(e).__name__}: {e}"))
result = dict(device=kind, peak_tflops=peak, hbm_tbps=bw, rows=rows)
json.dump(result, open(os.path.join(out, "roofline.json"), "w"), indent=2)
for r in rows:
  print(r)
PY

echo "kernel tests exit code: $tests_rc" | tee -a "$OUT/kernel_tests.log"
exit "$tests_rc"
