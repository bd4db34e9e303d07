#!/bin/sh
# Here (a machine with pip's registry): gather what a lent NVIDIA machine lacks
# for bench/device/issue22.py into .device/ (git-ignored), which the device
# tool's `carry` takes along. Its Python is 3.12 with torch's CUDA 13 libraries
# (the device library's KINDS.md); it has no mlx, mlx-lm or msgspec.
#
#     sh bench/device/prepare.sh
#
# mlx-cuda-13's wheel (~90 MB) is over one call's 64 MiB, so it travels in two
# halves: .device/a (call 1, stage.sh keeps it in /tmp) and .device/b (call 2,
# run.sh joins them). Steps: bench/README.md § On a lent GPU machine.
set -eu
cd "$(dirname "$0")/../.."
MLX=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('mlx'))")
LM=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('mlx-lm'))")
MSGSPEC=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('msgspec'))")
# a fresh download folder: one version of each wheel (two would stop the install there)
rm -rf .device /tmp/mlx-worker-device
mkdir -p .device/a .device/b/wheels .device/b/tokenizer /tmp/mlx-worker-device
for spec in "mlx==$MLX" "mlx-cuda-13==$MLX" "mlx-lm==$LM" "msgspec==$MSGSPEC"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d /tmp/mlx-worker-device "$spec"
done
cuda=$(ls /tmp/mlx-worker-device/mlx_cuda_13-*.whl)
split -b 46m "$cuda" /tmp/mlx-worker-device/part.
mv /tmp/mlx-worker-device/part.aa .device/a/cuda.part
mv /tmp/mlx-worker-device/part.ab .device/b/cuda.part
basename "$cuda" > .device/b/cuda.name
cp /tmp/mlx-worker-device/mlx-*.whl /tmp/mlx-worker-device/mlx_lm-*.whl /tmp/mlx-worker-device/msgspec-*.whl \
  .device/b/wheels/
# the 1B models are drawn there (issue22.py); only small-llama's tokenizer travels
.venv/bin/python -c "from fixtures.build import ensure_model; ensure_model('small-llama')"
cp fixtures/models/small-llama/tokenizer.json fixtures/models/small-llama/tokenizer_config.json \
  fixtures/models/small-llama/chat_template.jinja .device/b/tokenizer/
du -sh .device/a .device/b
