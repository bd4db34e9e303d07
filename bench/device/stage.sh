#!/bin/sh
# On the lent machine, call 1 (carry: .device/a): keep the first half of
# mlx-cuda-13's wheel where the next call on this warm machine finds it.
set -eu
mkdir -p /tmp/mlx-worker-device
cp .device/a/cuda.part /tmp/mlx-worker-device/cuda.part.a
ls -la /tmp/mlx-worker-device
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
