"""Issue-6 figures on a trained model: suspect ranking quality, iterative healing, discover-then-retrain.

    python benchmarks/suspects_bench.py --train-run runs/train/<cpu_bench run> [--discovery 1,0.1,0.5,1.0]
        [--methods potion,potion_iterative] [--method-discovery discover_retrain:0.1] [--section suspects]

Runs every (method, discovery) cell in process (``force=true``: re-measured even when a run folder
exists) and writes a table into docs/results.md between the section's markers: healed / acc_drop, the
suspect ranking's precision / recall at the suggested cut-off and AP, iterative rounds, and a mean row
per method over the discovery shares it ran.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, command_line, discovery_label, discovery_overrides, fmt, markdown_table, unlearn, write_section


def _rounds(s: dict) -> str:
    """Forget-set size per round of an iterative run (e.g. 50 -> 500), or empty."""
    sizes = [s.get(f"round{r}_forget_size") for r in range(1, int(s.get("rounds_run") or 0) + 1)]
    return " -> ".join(f"{v:.0f}" for v in sizes if v is not None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-run", required=True)
    ap.add_argument("--discovery", default="1,0.1,0.5,1.0")
    ap.add_argument("--methods", default="potion,potion_iterative")
    ap.add_argument("--method-discovery", action="append", default=[],
                    help="METHOD:SHARES run METHOD at these shares only, e.g. discover_retrain:0.1")
    ap.add_argument("--extra", action="append", default=[], help="extra unlearn override for every cell")
    ap.add_argument("--section", default="suspects")
    ap.add_argument("--title", default="Suspect ranking, iterative healing, discover-then-retrain (CPU, cpu_bench "
                    "model)")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    plan = [(m, args.discovery.split(",")) for m in args.methods.split(",") if m]
    plan += [(m, shares.split(",")) for m, shares in (item.split(":", 1) for item in args.method_discovery)]
    rows, means = [], []
    for method, shares in plan:
        healed, drops = [], []
        for share in shares:
            s = unlearn(args.train_run, [f"method={method}", *discovery_overrides(share), "save_weights=false",
                                         "force=true", "method.importance.cache=false", *args.extra])
            healed.append(s["healed"])
            drops.append(s["acc_drop"])
            rows.append([method, discovery_label(share), fmt(s["healed"]), fmt(s["acc_drop"], 2),
                         fmt(s.get("suspect_precision"), 3), fmt(s.get("suspect_recall"), 3),
                         fmt(s.get("suspect_ap"), 3), f"{s.get('suspects_flagged', 0):.0f}", _rounds(s),
                         f"{s['unlearn_seconds']:.0f}"])
            print(rows[-1], flush=True)
        means.append([method, f"{len(shares)} cells", f"**{statistics.mean(healed):.1f}**",
                      f"**{statistics.mean(drops):.2f}**"])
    body = "\n\n".join([
        f"### {args.title}",
        f"Poisoned model: `{args.train_run}`. Command: `{command_line()}`",
        "Suspect metrics are measured against the undiscovered poisoned samples of the retain set at the "
        "suggested cut-off (precision, recall) and over the whole ranking (AP). Rounds: forget-set size per "
        "round of potion_iterative. Seconds: the method's wall time (importances computed cold).",
        markdown_table(["method", "discovery", "healed", "acc_drop", "suspect precision", "suspect recall",
                        "suspect AP", "flagged", "rounds", "seconds"], rows),
        markdown_table(["method", "cells", "mean healed", "mean acc_drop"], means)])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
