#!/usr/bin/env bash
# The prepared GPU check (device machine): carried wheels + carried CIFAR-10 pack -> benchmarks/gpu_bench.py.
# Carry: .whl (hydra-core, omegaconf, antlr4 wheels) and .devdata (cifar10-jpg.tar.gz). Results land in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_bench}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export POTION_CACHE_DIR=/tmp/potion-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_bench.py --data .devdata/cifar10-jpg.tar.gz --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
