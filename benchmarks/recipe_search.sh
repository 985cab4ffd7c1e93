#!/usr/bin/env bash
# GPU-side recipe search for experiment=cpu_bench (ResNet-9 width 1/4, 10 epochs): which optimiser settings reach
# the clean-accuracy and attack-success targets. Figures are indicative for the CPU run (bf16 vs fp32).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/recipe_search}; mkdir -p "$OUT"
DATA=${DATA:-.devdata/cifar10-jpg.tar.gz}
run() {  # name overrides...
  local name=$1; shift
  python3 train.py experiment=cpu_bench trainer=gpu logger=none dataset.path=$DATA out_dir=/tmp/recipe/$name \
    train.epoch_eval=false train.epochs=10 "$@" 2>&1 | grep -E "clean_acc|error" | sed "s/^/$name: /" | tee -a "$OUT/recipes.txt"
}
run A train.batch_size=128 train.lr=0.1 train.label_smoothing=0 train.warmup=0.1
run B train.batch_size=256 train.lr=0.2 train.label_smoothing=0 train.warmup=0.15
run C train.batch_size=512 train.lr=0.4 train.label_smoothing=0 train.warmup=0.15
run E train.batch_size=512 train.lr=0.2 train.label_smoothing=0.1 train.warmup=0.15
