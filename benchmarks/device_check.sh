#!/usr/bin/env bash
# One prepared device call: carried wheels, the cpu_bench recipe search, then the paper_cifar10 GPU benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/device_check} POTION_CACHE_DIR=/tmp/potion-cache PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$OUT/gpu.txt"
timeout ${RECIPE_SECONDS:-240} bash benchmarks/recipe_search.sh
timeout ${BENCH_SECONDS:-330} python3 benchmarks/gpu_bench.py --data .devdata/cifar10-jpg.tar.gz --out "$OUT" 2>&1 \
  | grep -v -i warn | tee "$OUT/gpu_bench.log"
