#!/usr/bin/env bash
# A virtual environment in which `python -m experiments.bench --suite=train` also runs MaxText's own train
# step (experiments/benchmarks/maxtext_step.py) next to ours and transformers', all in one process.
#
# MaxText needs Python >= 3.12, so this is a second environment beside the README's: PYTHON names a 3.12
# interpreter (default python3.12), VENV where to make it (default .venv-maxtext). MaxText 0.2.4 is the
# release for jax 0.10; it is installed without its dependency list (its extras pin a TPU or CUDA stack)
# and with the packages its model, config and train-step modules import. jax / flax stay at the versions
# this package is tested with. torch on Python 3.12 comes from PyPI (a CUDA build; it runs on the CPU).
# Usage: bash experiments/maxtext_env.sh && .venv-maxtext/bin/python -m experiments.bench --suite=train \
#          --maxtext=dense,sparse,capacity
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.12}"
VENV="${VENV:-.venv-maxtext}"
"$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
pins="$VENV/pins.txt"
printf '%s\n' jax==0.10.2 jaxlib==0.10.2 flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8 > "$pins"
"$PIP" install -q -c "$pins" -e .
"$PIP" install -q --no-deps maxtext==0.2.4
"$PIP" install -q -c "$pins" qwix aqtp pathwaysutils tokamax omegaconf immutabledict jaxtyping einshape \
  typeguard==2.13.3 pyyaml jinja2 pydantic tensorboardx sentencepiece tiktoken grain drjax pillow sympy \
  google-cloud-storage fastapi uvicorn opentelemetry-api torch==2.13.0 transformers==5.24.0
DECOUPLE_GCLOUD=TRUE "$VENV/bin/python" -c "
from experiments.benchmarks import maxtext_step
assert maxtext_step.available(), 'maxtext does not import'
import maxtext; print('maxtext', maxtext.__version__, 'ready in $VENV')"
