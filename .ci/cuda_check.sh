#!/usr/bin/env bash
# The CUDA compile check (tests/gpu) in fresh environments built by .ci/cuda_env.sh, no GPU needed:
# jax 0.10.2 (every case: lower, verify, compile to PTX for sm_90a, ptxas; the train steps also compiled whole
# by XLA for an H100) and jax 0.11.2 (the bf16 cases but the small preset's train step: lower, verify, and
# compile whole by XLA for an H100). Usage: bash .ci/cuda_check.sh [ENV_ROOT]   (default: a temporary directory)
set -uo pipefail
cd "$(dirname "$0")/.."
root="${1:-$(mktemp -d)}"
rc=0
for v in 0.10 0.11; do
  env="$root/cuda-$v"
  [ -x "$env/bin/python" ] || bash .ci/cuda_env.sh "$env" "$v" || { rc=1; continue; }
  select=""
  [ "$v" = 0.11 ] && select="not float32 and not small"
  echo "== CUDA compile check, jax $v"
  start=$SECONDS
  PYTHONPATH="$PWD" JAX_PLATFORMS=cpu "$env/bin/python" -m pytest -q -p no:cacheprovider tests/gpu \
    -k "$select" || rc=1
  echo "== jax $v: $((SECONDS - start)) s"
done
exit "$rc"
