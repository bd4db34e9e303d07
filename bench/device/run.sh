#!/bin/bash
# On the lent machine, call 2 (carry: .device/b), right after stage.sh on the
# same warm machine: join and install the wheels, then measure.
#
#     bash bench/device/run.sh [BUDGET_S]     (default 420: leaves a 10-minute call room)
set -euo pipefail
site=/tmp/site
parts=/tmp/mlx-worker-device
if [ ! -f "$parts/cuda.part.a" ]; then
  echo "no $parts/cuda.part.a: run bench/device/stage.sh first on this machine (a fresh one is bare)" >&2
  exit 2
fi
cat "$parts/cuda.part.a" .device/b/cuda.part > "$parts/$(cat .device/b/cuda.name)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
  .device/b/wheels/*.whl "$parts/$(cat .device/b/cuda.name)"
# mlx-cuda finds cuBLAS, cuDNN, NVRTC... beside it in site-packages; here they
# are torch's, in the machine's own environment
libs=$(python3 -c "import glob, site; print(':'.join(d for p in site.getsitepackages() for d in sorted(set(glob.glob(p + '/nvidia/*/lib') + glob.glob(p + '/nvidia/cu*/lib')))))")
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.device_info() if hasattr(mx, 'device_info') else '')"
python3 bench/device/issue22.py --out "${OUT:-/tmp/out}" --budget "${1:-420}"
