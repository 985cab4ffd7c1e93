"""The retain importance from a subset: the smallest `method.importance.retain_samples` that heals as the full pass.

    nice -n 15 python benchmarks/retain_subset.py --train-run runs/train/cpu_bench-<hash> [--train-run ...]
        [--cells 1,0.1,0.5] [--sizes 2000,5000,10000] [--section retain_subset]

Potion's cost is one importance pass over the retain set (its floor); estimating the retain importance from a
random subset of it (seeded, drawn once per run) cuts that pass in proportion. For every model and
discovery cell, potion runs once with the full pass and once per subset size (suspects and the clean
reference off; the subset runs with a cold importance cache, so their seconds are honest). A size *holds*
on a cell when healed is at most ``--healed-tol`` (1) point below and acc_drop at most ``--drop-tol`` (0.5)
point above the full pass; the table names the smallest size that holds on every cell, and each cell's seconds over
the floor (one forward+backward pass of the retain set, measured before the first cell and after the last).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, command_line, discovery_label, discovery_overrides, fmt, markdown_table, unlearn, write_section
from cpu_grid import retain_pass_seconds
from ptn_floor import processor

from potion.pipelines.run_folders import load_trained_run, read_summary

BASE = ["method=potion", "suspects.enabled=false", "reference=off", "logger=none", "save_weights=false"]


def run_cell(train_run: str, share: str, size: int | None) -> dict[str, Any]:
    """One potion run; ``size`` None = the full retain pass (importance cache allowed: only its result is used)."""
    extra = ["method.importance.cache=true"] if size is None else [
        "method.importance.cache=false", "force=true", f"method.importance.retain_samples={size}"]
    return unlearn(train_run, [*BASE, *discovery_overrides(share), *extra])


def holds(full: dict[str, Any], sub: dict[str, Any], healed_tol: float, drop_tol: float) -> bool:
    """No worse than the full pass beyond the tolerances (healing more, or losing less accuracy, is no miss)."""
    return sub["healed"] >= full["healed"] - healed_tol and sub["acc_drop"] <= full["acc_drop"] + drop_tol


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-run", action="append", required=True, help="a finished training run folder")
    ap.add_argument("--cells", default="1,0.1,0.5", help="discovery shares (1 = one discovered sample)")
    ap.add_argument("--sizes", default="2000,5000,10000", help="retain_samples values to try")
    ap.add_argument("--healed-tol", type=float, default=1.0)
    ap.add_argument("--drop-tol", type=float, default=0.5)
    ap.add_argument("--section", default="retain_subset")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()

    torch.set_num_threads(2)
    sizes = [int(s) for s in args.sizes.split(",")]
    shares = args.cells.split(",")
    floor_before = retain_pass_seconds(args.train_run[0], discovery_overrides(shares[0]), 256)
    results: list[tuple[str, str, dict[str, Any], dict[int, dict[str, Any]]]] = []
    for run in args.train_run:
        if read_summary(Path(run)) is None:
            raise SystemExit(f"error: {run} is not a finished training run")
        for share in shares:
            full = run_cell(run, share, None)
            subs = {}
            for size in sizes:
                subs[size] = s = run_cell(run, share, size)
                print(f"{run} {discovery_label(share)} retain_samples={size}: healed {fmt(s['healed'])} "
                      f"(full {fmt(full['healed'])}) drop {fmt(s['acc_drop'], 2)} (full {fmt(full['acc_drop'], 2)}) "
                      f"{s['unlearn_seconds']:.1f} s", flush=True)
            results.append((run, share, full, subs))
    floor = (floor_before + retain_pass_seconds(args.train_run[-1], discovery_overrides(shares[-1]), 256)) / 2
    ok = {size: all(holds(full, subs[size], args.healed_tol, args.drop_tol) for _, _, full, subs in results)
          for size in sizes}
    smallest = min((s for s in sizes if ok[s]), default=None)
    header = ["model", "discovery", "full: healed / acc_drop", *[f"{s}: healed / acc_drop / x floor" for s in sizes]]
    rows = []
    for run, share, full, subs in results:
        attack = str(load_trained_run(run).cfg.poison.trigger.kind)
        cells = []
        for size in sizes:
            s = subs[size]
            mark = "" if holds(full, s, args.healed_tol, args.drop_tol) else " ✗"
            cells.append(f"{fmt(s['healed'])} / {fmt(s['acc_drop'], 2)} / {s['unlearn_seconds'] / floor:.2f}x{mark}")
        rows.append([f"`{run}` ({attack})", discovery_label(share),
                     f"{fmt(full['healed'])} / {fmt(full['acc_drop'], 2)}", *cells])
    verdict = (f"Smallest size that holds on every cell (healed at most {args.healed_tol:g} point below, acc_drop at "
               f"most {args.drop_tol:g} point above the full pass): **{smallest}**." if smallest is not None else
               "No size holds on every cell.")
    body = "\n\n".join([
        "### The retain importance from a subset",
        f"Processor: {processor()}; 2 torch threads. {time.strftime('%Y-%m-%d')}. Floor (one forward+backward "
        f"pass of the retain set, mean of before and after): {floor:.1f} s.",
        f"Command: `{command_line()}`",
        markdown_table(header, rows),
        verdict + " ✗ marks a cell outside the tolerances.",
    ])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
