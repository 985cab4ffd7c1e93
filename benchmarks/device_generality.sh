#!/usr/bin/env bash
# Third prepared device call: generality - the cpu_bench setting with a blended trigger and with target class 3.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/device_generality} POTION_CACHE_DIR=/tmp/potion-cache PYTHONUNBUFFERED=1
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
D="dataset.path=.devdata/cifar10-jpg.tar.gz logger=none trainer=gpu train.batch_size=512 train.lr=0.4 train.warmup=0.15 train.epochs=10"
timeout ${STUDY_SECONDS:-170} python3 benchmarks/gpu_study.py --out "$OUT" \
  --train "experiment=cpu_bench $D poison=blend" --train "experiment=cpu_bench $D poison.target=3" \
  --cell "potion|1|" --cell "potion|0.1|" --cell "potion|0.5|" --cell "potion|1.0|" \
  2>&1 | grep -v -i -E "warn|tip|LOCAL_RANK|available|Trainer.fit|bfloat16|Tensor Cores" | tee "$OUT/study.log"
