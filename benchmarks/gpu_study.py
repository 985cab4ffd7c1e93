"""A batch of unlearning variants on one trained model, for a lent GPU (or CPU with --tiny).

    python benchmarks/gpu_study.py --train "experiment=paper_cifar10 ..." \
        --cell "potion|0.1|method.importance.order=shuffled" --cell "potion|1|method.synthesis.enabled=true" ...

Each cell is method|discovery|space-separated overrides; prints one line per cell and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import command_line, discovery_label, discovery_overrides, train, unlearn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="append", required=True, help="train overrides (one model per --train)")
    ap.add_argument("--cell", action="append", default=[])
    ap.add_argument("--out", default="runs/gpu_study")
    args = ap.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = []
    for spec in args.train:
        trained = train(spec.split())
        print(f"[{spec}] clean_acc={trained['clean_acc']:.4f} asr={trained['asr']:.4f} "
              f"fit_seconds={trained['train_seconds']:.1f}", flush=True)
        row = {"train": spec, "clean_acc": trained["clean_acc"], "asr": trained["asr"],
               "train_seconds": trained["train_seconds"], "cells": []}
        trainer = "trainer=gpu" if torch.cuda.is_available() else "trainer=cpu"
        for cell in args.cell:
            method, share, *rest = cell.split("|")
            extra = rest[0].split() if rest and rest[0] else []
            s = unlearn(trained["run_dir"], [f"method={method}", *discovery_overrides(share), trainer, "logger=none",
                                             "save_weights=false", *extra])
            keep = {k: s.get(k) for k in ("healed", "acc_drop", "asr", "unlearn_seconds", "ptn_steps",
                                          "suspect_precision", "suspect_recall", "suspect_ap", "synth_flip_rate")}
            row["cells"].append({"cell": cell, **keep})
            print(f"  {method:>16} {discovery_label(share):>9} {' '.join(extra):<55} " +
                  " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in keep.items()),
                  flush=True)
        results.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_study.json").write_text(json.dumps({"device": device, "command": command_line(),
                                                    "results": results}, indent=2))


if __name__ == "__main__":
    main()
