"""Potion against its floor: each cell's wall time over one forward+backward pass of the retain set.

    nice -n 15 python benchmarks/ptn_floor.py --train-run runs/train/cpu_bench-<hash>
        [--cells 1:full,1,0.1,0.5] [--extra method.importance.retain_samples=5000] [--section ptn_floor]

A cell is ``<discovery>[:<method.ptn.measure>]`` (``1`` = one discovered sample; measure ``decisive``, the
default, or ``full``, the scan before it measured every step in full). Every cell runs in process with a
cold importance cache, suspects and the clean reference off (neither is part of ``unlearn_seconds``),
and between two floor measurements (``cpu_grid.retain_pass_seconds``): its ratio is over their mean, so
a machine whose load drifts during the run is compared with itself. Cells of one discovery share are
checked to choose the same PTN step and write identical weights. The table goes into docs/results.md
between the section's markers, with the processor it ran on.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, command_line, discovery_label, discovery_overrides, fmt, markdown_table, unlearn, write_section
from cpu_grid import retain_pass_seconds
from safetensors.torch import load_file

from potion.pipelines.run_folders import read_summary


def processor() -> str:
    """The CPU's model name and whether it computes bf16 natively (the avx512_bf16 / amx_bf16 flags)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown processor"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "").split()
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs, " + (
        f"native bf16 ({', '.join(bf16)})" if bf16 else "no native bf16 (no avx512_bf16)")


def run_cell(train_run: str, share: str, measure: str, extra: list[str]) -> dict[str, Any]:
    over = ["method=potion", *discovery_overrides(share), "method.importance.cache=false", "suspects.enabled=false",
            "reference=off", "logger=none", "force=true", f"method.ptn.measure={measure}", *extra]
    return unlearn(train_run, over)


def same_weights(a: str, b: str) -> bool:
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-run", required=True, help="a finished training run folder (the cpu_bench BadNets model)")
    ap.add_argument("--cells", default="1:full,1,0.1,0.5")
    ap.add_argument("--extra", action="append", default=[], help="an unlearn override for every cell")
    ap.add_argument("--section", default="ptn_floor")
    ap.add_argument("--title", default="Potion against its floor on the cpu_bench BadNets model")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--floors", choices=("each", "ends"), default="each",
                    help="measure the floor around each cell, or only before the first and after the last")
    args = ap.parse_args()

    torch.set_num_threads(2)
    trained = read_summary(Path(args.train_run))
    if trained is None:
        raise SystemExit(f"error: {args.train_run} is not a finished training run")
    cells = [(c.split(":") + ["decisive"])[:2] for c in args.cells.split(",")]
    rows, by_share = [], {}
    floor = retain_pass_seconds(args.train_run, discovery_overrides(cells[0][0]), 256)
    results = []
    for i, (share, measure) in enumerate(cells):
        s = run_cell(args.train_run, share, measure, args.extra)
        results.append((share, measure, s))
        by_share.setdefault(share, []).append(s)
        print(f"{discovery_label(share)} {measure}: {s['unlearn_seconds']:.1f} s, PTN steps {s['ptn_steps']:.0f}",
              flush=True)
        if args.floors == "each" or i == len(cells) - 1:
            after = retain_pass_seconds(args.train_run, discovery_overrides(share), 256)
            for j in range(len(results) - (1 if args.floors == "each" else len(results)), len(results)):
                results[j] = (*results[j][:3], (floor + after) / 2)
            floor = after
    for share, measure, s, mean_floor in results:
        rest = s["unlearn_seconds"] - s["importance_seconds"] - s["search_seconds"]
        rows.append([discovery_label(share), measure, s["n_f"], f"{s['retain_importance_samples']:.0f}",
                     f"{s['ptn_steps']:.0f}", fmt(s["healed"]),
                     fmt(s["acc_drop"], 2), f"{s['unlearn_seconds']:.1f}", f"{s['importance_seconds']:.1f}",
                     f"{s['search_seconds']:.1f}", f"{rest:.1f}", f"{mean_floor:.1f}",
                     f"**{s['unlearn_seconds'] / mean_floor:.2f}x**"])
        print(" | ".join(str(c) for c in rows[-1]), flush=True)
    checks = []
    for share, runs in by_share.items():
        for other in runs[1:]:
            same = other["ptn_steps"] == runs[0]["ptn_steps"] and same_weights(runs[0]["run_dir"], other["run_dir"])
            checks.append(f"- {discovery_label(share)}: the {len(runs)} scans chose "
                          f"{'the same step with identical weights' if same else 'DIFFERENT steps or weights'}.")
    header = ["discovery", "measure", "n_f", "retain importance samples", "PTN steps", "healed", "acc_drop",
              "unlearn s", "importance s", "search s", "other s (synthesis, set-up)", "floor s", "x floor"]
    body = "\n\n".join([
        f"### {args.title}",
        f"Poisoned model: `{args.train_run}` (clean_acc {trained['clean_acc']:.4f}, asr {trained['asr']:.4f}, "
        f"n_p {trained['n_p']}). Processor: {processor()}; 2 torch threads, run under `nice -n 15` on a machine "
        f"shared with a training job. {time.strftime('%Y-%m-%d')}.",
        f"Command: `{command_line()}`",
        markdown_table(header, rows),
        "Floor: one forward+backward pass (cross-entropy, batch 256) over the retain set, measured before and "
        + ("after each cell; a cell's ratio is over the mean of the two." if args.floors == "each" else
           "after the whole run; every cell's ratio is over the mean of the two."),
        "\n".join(checks) if checks else "",
    ])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
