#!/usr/bin/env bash
# A prepared GPU run (device machine): carried wheels + carried CIFAR-10 pack -> a benchmark script, results in $OUT.
#   bash benchmarks/gpu_bench.sh                          # benchmarks/gpu_bench.py (paper_cifar10 + potion cells)
#   SCRIPT=paper_grid_gpu bash benchmarks/gpu_bench.sh    # benchmarks/paper_grid_gpu.py (the paper grid, 10 min)
# Carry: .whl (hydra-core, omegaconf, antlr4 wheels; mlflow's if the machine lacks it) and .devdata
# (cifar10-jpg.tar.gz).
set -uo pipefail
cd "$(dirname "$0")/.."
SCRIPT=${SCRIPT:-gpu_bench}
OUT=${OUT:-runs/$SCRIPT}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
export POTION_CACHE_DIR=/tmp/potion-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 "benchmarks/$SCRIPT.py" --data .devdata/cifar10-jpg.tar.gz --out "$OUT" "$@" 2>&1 | tee "$OUT/$SCRIPT.log"
