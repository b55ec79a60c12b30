#!/usr/bin/env bash
# Kernel checks on one GPU machine, under 8 minutes: the kernel tests compiled through Triton
# (every test calls the kernels with interpret=None, which compiles on a GPU backend), then the
# kernel benchmark on DeepSeek-V3 shapes, written to "$OUT/kernels.json".
# Usage, from anywhere: OUT=/some/dir bash experiments/gpu_kernels.sh
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" gpu_kernels

# Compiled-kernel tests; a failure is recorded but the benchmark still runs.
tests_rc=0
timeout 210 "$PY" -m pytest tests/kernels -q -s -p no:cacheprovider 2>&1 \
  | tee "$OUT/kernel_tests.log" || tests_rc=$?

timeout 240 "$PY" -m experiments.bench --suite=kernels --json="$OUT/kernels.json" 2>&1 \
  | tee "$OUT/bench.log"

echo "kernel tests exit code: $tests_rc" | tee -a "$OUT/kernel_tests.log"
exit "$tests_rc"
