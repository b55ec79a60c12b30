#!/usr/bin/env bash
# The CUDA compile check (tests/gpu) in fresh environments built by .ci/cuda_env.sh, no GPU needed:
# jax 0.10.2 (every case: lower, verify, compile each kernel to PTX for sm_90a, ptxas) and jax 0.11.2 (one bf16
# case per kernel, tokamax's ragged_dot and the tiny preset's bf16 train step: lower, verify, and compile the
# whole program with XLA for an H100). Usage: bash .ci/cuda_check.sh [ENV_ROOT]   (default: a temporary directory)
set -uo pipefail
cd "$(dirname "$0")/.."
root="${1:-$(mktemp -d)}"
rc=0
for v in 0.10 0.11; do
  env="$root/cuda-$v"
  [ -x "$env/bin/python" ] || bash .ci/cuda_env.sh "$env" "$v" || { rc=1; continue; }
  cases=all
  [ "$v" = 0.11 ] && cases=quick
  echo "== CUDA compile check, jax $v"
  start=$SECONDS
  DSJ_CUDA_CHECK_CASES="$cases" PYTHONPATH="$PWD" JAX_PLATFORMS=cpu \
    "$env/bin/python" -m pytest -q -p no:cacheprovider tests/gpu || rc=1
  echo "== jax $v: $((SECONDS - start)) s"
done
exit "$rc"
