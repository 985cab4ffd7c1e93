"""Issue-6 figures on a trained model: suspect ranking quality, iterative healing, discover-then-retrain.

    python benchmarks/suspects_bench.py --train-run runs/train/<cpu_bench run> [--discovery 1,0.1]
        [--methods potion,potion_iterative,discover_retrain]

Writes a table into docs/results.md (section suspects).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import ROOT, command_line, discovery_label, discovery_overrides, fmt, markdown_table, unlearn, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-run", required=True)
    ap.add_argument("--discovery", default="1,0.1")
    ap.add_argument("--methods", default="potion,potion_iterative,discover_retrain")
    ap.add_argument("--section", default="suspects")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        for share in args.discovery.split(","):
            s = unlearn(args.train_run, [f"method={method}", *discovery_overrides(share), "save_weights=false",
                                         "force=true"])
            rows.append([method, discovery_label(share), fmt(s["healed"]), fmt(s["acc_drop"], 2),
                         fmt(s.get("suspect_precision"), 3), fmt(s.get("suspect_recall"), 3),
                         fmt(s.get("suspect_ap"), 3), s.get("suspects_flagged"), f"{s['unlearn_seconds']:.0f}"])
            print(rows[-1], flush=True)
    body = "\n\n".join([
        "### Suspect ranking, iterative healing, discover-then-retrain (CPU, cpu_bench model)",
        f"Command: `{command_line()}`",
        "Suspect metrics are measured against the undiscovered poisoned samples of the retain set at the "
        "suggested cut-off (precision, recall) and over the whole ranking (AP).",
        markdown_table(["method", "discovery", "healed", "acc_drop", "suspect precision", "suspect recall",
                        "suspect AP", "flagged", "seconds"], rows)])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
