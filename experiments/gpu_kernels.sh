#!/usr/bin/env bash
# Kernel checks on one GPU machine, under 8 minutes: the kernel tests compiled through Triton
# (every test calls the kernels with interpret=None, which compiles on a GPU backend), then the
# kernel benchmark on DeepSeek-V3 shapes, written to "$OUT/kernels.json".
# Usage, from anywhere: OUT=/some/dir bash experiments/gpu_kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-$PWD/runs/gpu_kernels}"
mkdir -p "$OUT"

# The GPU image brings jax[cuda]; install only this package, never its dependencies.
"$PY" -c "import kernels, deepseek_jax" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
"$PY" - <<'PY' | tee "$OUT/env.txt"
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: the kernels would run in interpret mode"
PY

# Compiled-kernel tests; a failure is recorded but the benchmark still runs. tests/conftest.py defaults
# JAX_PLATFORMS to cpu for the test suite: name the GPU platform explicitly here.
export JAX_PLATFORMS=cuda
tests_rc=0
timeout 210 "$PY" -m pytest tests/kernels -q -s -p no:cacheprovider 2>&1 \
  | tee "$OUT/kernel_tests.log" || tests_rc=$?

timeout 240 "$PY" -m experiments.bench --suite=kernels --json="$OUT/kernels.json" 2>&1 \
  | tee "$OUT/bench.log"

echo "kernel tests exit code: $tests_rc" | tee -a "$OUT/kernel_tests.log"
exit "$tests_rc"
