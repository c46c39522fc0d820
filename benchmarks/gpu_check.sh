#!/usr/bin/env bash
# One short CUDA check (about 3 minutes on an H100, 5 at most): the speed/memory benchmark at a realistic size
# (1x256^3 case, nnU-Net default 3d_fullres network with a 128^3 patch, memory at 128^3 vs 256^3) and the gpu tests.
# Results go to $OUT when set (the lent-device convention), else to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export nnUNet_compile=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu_check_device.txt"
timeout 200 python benchmarks/speed.py --device cuda --size 256 --channels 1 --patch 128 --out "$out"
timeout 90 python -m pytest -q -m gpu tests/ 2>&1 | tee "$out/gpu_check_pytest.txt"
