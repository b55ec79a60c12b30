# Sourced by the GPU check scripts: installs this package (never its dependencies: the GPU image brings
# jax[cuda]), checks that jax sees a GPU, sets PY and OUT (default runs/<name>) and JAX_PLATFORMS=cuda.
# Usage: source experiments/gpu_env.sh <name>
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-$PWD/runs/$1}"
mkdir -p "$OUT"
"$PY" -c "import kernels, deepseek_jax" 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
"$PY" - <<'PY' | tee "$OUT/env.txt"
import jax
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices())
assert jax.default_backend() == "gpu", "no GPU backend: the kernels would run in interpret mode"
PY
# tests/conftest.py defaults JAX_PLATFORMS to cpu for the test suite: name the GPU platform explicitly.
export JAX_PLATFORMS=cuda
