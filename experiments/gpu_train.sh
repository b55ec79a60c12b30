#!/usr/bin/env bash
# Training-step throughput and MFU of the `small` preset on one GPU, under 2.5 minutes (after
# experiments/gpu_kernels.sh: both under 8): bf16, batch 32 x 2048, the Pallas attention and grouped-matmul
# kernels ('auto': the GPU defaults of docs/gpu.md), written to "$OUT/train_small.json" with
# MFU against the measured bf16 matmul peak and against the datasheet's dense bf16 peak, and a profile of
# the step in "$OUT/profile" (ops.json, summary.txt: where the step's time goes, by module).
# Usage, from anywhere: OUT=/some/dir bash experiments/gpu_train.sh
set -euo pipefail
source "$(dirname "$0")/gpu_env.sh" gpu_train
timeout 150 "$PY" -m experiments.bench --suite=train --preset=small --dtype=bfloat16 --batch=32 \
  --seq_len=2048 --runs=3 --maxtext=none --json="$OUT/train_small.json" --profile="$OUT/profile" 2>&1 \
  | tee "$OUT/train.log"
