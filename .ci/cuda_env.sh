#!/usr/bin/env bash
# Builds a CUDA compile-check environment: a Python 3.12 venv with jax, its CUDA plugin and a ptxas, used to
# lower, verify and compile the Pallas kernels for H100/H200 on a machine without a GPU (docs/gpu.md).
# It lives outside the package's own install: `pip install -e .` for a CPU user is unchanged.
# Usage: bash .ci/cuda_env.sh DIR 0.10|0.11     (then DIR/bin/python -m pytest tests/gpu)
#   0.10: jax/jaxlib 0.10.2 + jax-cuda12-plugin/pjrt 0.10.2 (exposes the Triton compiler) + nvidia-cuda-nvcc-cu12
#   0.11: jax/jaxlib 0.11.2 + jax-cuda13-plugin/pjrt 0.11.2 (the GPU images' versions) + nvidia-cuda-nvcc,
#         and tokamax (its Mosaic GPU ragged_dot is checked beside gmm)
set -euo pipefail
if [ "$#" -ne 2 ]; then
  echo "usage: bash .ci/cuda_env.sh DIR 0.10|0.11" >&2
  exit 2
fi
dir="$1"; version="$2"
# A working Python 3.12: $PYTHON312, pyenv's installs, then python3.12 on PATH (a pyenv shim on PATH may
# name a version that is not selected, so each candidate is run once).
py=""
for cand in ${PYTHON312:-} /root/.pyenv/versions/3.12*/bin/python "$(command -v python3.12 || true)"; do
  if [ -n "$cand" ] && [ -x "$cand" ] && \
     "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    py="$cand"; break
  fi
done
if [ -z "$py" ]; then
  echo "cuda_env.sh: no working Python 3.12 found (set PYTHON312); the CUDA plugins are installed for 3.12" >&2
  exit 2
fi
case "$version" in
  0.10) jaxv=0.10.2; plugin="jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2"; nvcc=nvidia-cuda-nvcc-cu12
        extra="flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 chex==0.1.92";;
  0.11) jaxv=0.11.2; plugin="jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2"; nvcc=nvidia-cuda-nvcc
        extra="flax optax orbax-checkpoint chex tokamax";;
  *) echo "cuda_env.sh: version must be 0.10 or 0.11, got '$version'" >&2; exit 2;;
esac
"$py" -m venv "$dir"
"$dir/bin/python" -m pip install -q --upgrade pip
"$dir/bin/python" -m pip install -q "jax==$jaxv" "jaxlib==$jaxv" $extra einops absl-py ml-collections \
  numpy safetensors tqdm tokenizers tensorboardX pytest
# The plugin's own dependencies would pull the CUDA runtime libraries (gigabytes) that compiling needs none of.
"$dir/bin/python" -m pip install -q --no-deps $plugin $nvcc
echo "cuda_env.sh: $dir ready (jax $jaxv)"
