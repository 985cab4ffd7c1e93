"""GPU benchmark for a lent machine (one H100/H200): paper_cifar10 training + potion and retrain.

    bash benchmarks/gpu_bench.sh            # on the GPU machine (installs carried wheels, writes $OUT)
    python benchmarks/gpu_bench.py --tiny   # the same script end to end on CPU with the quickstart setting

Trains `experiment=paper_cifar10` (ResNet-9, 4000 iterations, batch 512, bf16) on the CIFAR-10 JPEG pack,
then runs potion at 1 sample / 10 % / 50 % discovery and retrain at 10 %, printing times and metrics and
writing them to <out>/gpu_bench.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import command_line, discovery_label, discovery_overrides, train, unlearn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--out", default="runs/gpu_bench")
    ap.add_argument("--tiny", action="store_true", help="quickstart setting on CPU (checks the script runs)")
    ap.add_argument("--potion", default="1,0.1,0.5")
    ap.add_argument("--retrain", default="0.1")
    ap.add_argument("--train-extra", default="")
    args = ap.parse_args()

    if args.tiny:
        base = ["experiment=quickstart", "logger=none", "trainer=cpu"]
        trainer = "trainer=cpu"
    else:
        base = ["experiment=paper_cifar10", "dataset=cifar10_jpg", f"dataset.path={args.data}", "logger=none",
                "trainer=gpu"]
        trainer = "trainer=gpu"
    base += args.train_extra.split()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    print(f"device: {device}; torch {torch.__version__}", flush=True)
    t0 = time.perf_counter()
    trained = train(base)
    wall_train = time.perf_counter() - t0
    print(f"trained: clean_acc={trained['clean_acc']:.4f} asr={trained['asr']:.4f} "
          f"fit_seconds={trained['train_seconds']:.1f} wall_seconds={wall_train:.1f}", flush=True)
    cells = []
    plan = [("potion", s) for s in args.potion.split(",") if s] + [("retrain", s) for s in args.retrain.split(",") if s]
    for method, share in plan:
        over = [f"method={method}", *discovery_overrides(share), trainer, "logger=none"]
        if method == "potion":
            over.append("method.importance.cache=false")
        s = unlearn(trained["run_dir"], over)
        cells.append({"method": method, "discovery": discovery_label(share), **{
            k: s.get(k) for k in ("n_f", "clean_acc", "asr", "healed", "acc_drop", "unlearn_seconds",
                                  "importance_seconds", "search_seconds", "ptn_steps")}})
        print(f"{method:>8} {discovery_label(share):>9}: healed={s['healed']} acc_drop={s['acc_drop']} "
              f"asr={s['asr']:.4f} seconds={s['unlearn_seconds']:.2f}", flush=True)
    result = {"device": device, "torch": torch.__version__, "command": command_line(), "train_overrides": base,
              "train": {k: trained.get(k) for k in ("clean_acc", "poison_acc", "asr", "train_seconds", "steps",
                                                      "n_p")},
              "train_wall_seconds": wall_train, "cells": cells}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
