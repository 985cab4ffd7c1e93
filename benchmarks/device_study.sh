#!/usr/bin/env bash
# Second prepared device call: paper_cifar10 with a stronger recipe, then criterion / order / synthesis variants.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/device_study} POTION_CACHE_DIR=/tmp/potion-cache PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
D="dataset=cifar10_jpg dataset.path=.devdata/cifar10-jpg.tar.gz logger=none trainer=gpu"
timeout ${STUDY_SECONDS:-300} python3 benchmarks/gpu_study.py --out "$OUT" \
  --train "experiment=paper_cifar10 $D train.lr=0.1 train.nesterov=true train.warmup=0.1" \
  --cell "potion|1|" --cell "potion|1|method.synthesis.enabled=true" \
  --cell "potion|0.1|" --cell "potion|0.1|method.importance.order=shuffled" \
  --cell "potion|0.1|method.ptn.criterion=exclude_true_target" --cell "potion|0.1|method.ptn.rho=0.25" \
  --cell "potion|0.5|" --cell "potion|1.0|" \
  --cell "potion_iterative|1|method.synthesis.enabled=true" --cell "potion_iterative|0.1|" \
  2>&1 | grep -v -i -E "warn|tip|LOCAL_RANK|available|Trainer.fit" | tee "$OUT/study.log"
