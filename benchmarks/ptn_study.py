"""PTN stopping-criterion study on a trained poisoned model: rho x criterion (x synthesis) per discovery share.

    python benchmarks/ptn_study.py --train-run runs/train/<cpu_bench run> [--method potion]
        [--rhos 0.1,0.25] [--criteria all,exclude_true_target] [--discovery 1,0.1,0.5,1.0] [--synthesis]

Importances come from the content-addressed cache after the first variant of each cell, so the study costs
one importance pass per discovery share. Writes a table into docs/results.md (section ptn_study).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import ROOT, command_line, discovery_label, discovery_overrides, fmt, markdown_table, unlearn, write_section


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-run", required=True)
    ap.add_argument("--method", default="potion")
    ap.add_argument("--rhos", default="0.1,0.25")
    ap.add_argument("--criteria", default="all,exclude_true_target")
    ap.add_argument("--discovery", default="1,0.1,0.5,1.0")
    ap.add_argument("--synthesis", default="false", help="comma list of synthesis.enabled values, e.g. false,true")
    ap.add_argument("--section", default="ptn_study")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    args = ap.parse_args()
    shares = args.discovery.split(",")
    variants = [(r, c, s) for s in args.synthesis.split(",") for r in args.rhos.split(",")
                for c in args.criteria.split(",")]
    res: dict[tuple, dict] = {}
    for share in shares:
        for rho, crit, syn in variants:
            over = [f"method={args.method}", *discovery_overrides(share), f"method.ptn.rho={rho}",
                    f"method.ptn.criterion={crit}", f"method.synthesis.enabled={syn}", "suspects.enabled=false",
                    "save_weights=false"]
            s = unlearn(args.train_run, over)
            res[(share, rho, crit, syn)] = s
            print(f"{discovery_label(share):>9} rho={rho} {crit} synth={syn}: healed={fmt(s['healed'])} "
                  f"acc_drop={fmt(s['acc_drop'], 2)} steps={s.get('ptn_steps')}", flush=True)
    names = [f"rho {r}, {c}" + (", synthesis" if s == "true" else "") for r, c, s in variants]
    rows = []
    for share in shares:
        rows.append([discovery_label(share), *(f"{fmt(res[(share, *v)]['healed'])} / "
                                               f"{fmt(res[(share, *v)]['acc_drop'], 2)}" for v in variants)])
    mean_row, worst_row = ["mean"], ["worst acc_drop"]
    for v in variants:
        h = [res[(s, *v)]["healed"] for s in shares]
        d = [res[(s, *v)]["acc_drop"] for s in shares]
        mean_row.append(f"**{fmt(statistics.mean(h))} / {fmt(statistics.mean(d), 2)}**")
        worst_row.append(fmt(max(d), 2))
    rows += [mean_row, worst_row]
    body = "\n\n".join([f"### PTN stopping criterion study ({args.method})", f"Command: `{command_line()}`",
                        "Cells: healed / acc_drop. `exclude_true_target` ignores discovered samples whose true class "
                        "is the target in the stopping test (benchmark only: it needs true labels).",
                        markdown_table(["discovery", *names], rows)])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
