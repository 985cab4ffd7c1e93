"""The CPU unlearning grid on the cpu_bench poisoned model (issue: unlearning benchmark).

    python benchmarks/cpu_grid.py [--methods none,potion,...] [--discovery 1,0.1,0.5,1.0] [--section cpu_grid]
                                  [--extra 'method.ptn.rho=0.25'] [--train-overrides ...]

Trains (or reuses) `experiment=cpu_bench`, runs every (method, discovery) cell in process with a cold
importance cache (honest timings), measures the floor (one forward+backward pass over the retain set at
the importance batch size) and writes the table into docs/results.md between markers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from common import (
    ROOT,
    command_line,
    discovery_label,
    discovery_overrides,
    fmt,
    markdown_table,
    train,
    unlearn,
    write_section,
)

from potion.unlearning.methods import method_info

DEFAULT_METHODS = "none,retrain,finetune,ssd,assd,lfssd,potion"


def retain_pass_seconds(train_run: str, discovery: list[str], batch_size: int) -> float:
    """Wall time of one forward+backward pass (cross-entropy) over the retain set: potion's floor."""
    import torch.nn.functional as F

    from potion.data.discovery import discover
    from potion.data.poisoned import load_data, poison
    from potion.pipelines.run_folders import load_trained_run

    run = load_trained_run(train_run)
    data = poison(load_data(run.cfg.dataset), run.plan, run.poison_images)
    model = run.build_model(data.num_classes, data.channels).eval()
    share = None if discovery == ["discovery=single"] else float(discovery[0].split("=")[1])
    disc = discover(run.plan, share=share, count=1 if share is None else None, seed=0)
    images, labels, flags = data.bundle.train.images, data.train_labels, data.train_flags
    t0 = time.perf_counter()
    for i in range(0, disc.retain_idx.numel(), batch_size):
        idx = disc.retain_idx[i:i + batch_size]
        x = data.trigger.apply(data.normalizer(images[idx]), flags[idx])
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), labels[idx]).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--discovery", default="1,0.1,0.5,1.0")
    ap.add_argument("--section", default="cpu_grid")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
    ap.add_argument("--extra", action="append", default=[], help="extra unlearn override for every cell")
    ap.add_argument("--method-extra", action="append", default=[],
                    help="METHOD:override, e.g. finetune:method.iterations=245")
    ap.add_argument("--train-overrides", default="experiment=cpu_bench")
    ap.add_argument("--train-run", default=None, help="use this finished training run folder instead of training")
    ap.add_argument("--title", default="CPU grid on the cpu_bench model")
    args = ap.parse_args()

    torch.set_num_threads(2)
    if args.train_run:
        from potion.pipelines.run_folders import read_summary

        trained = read_summary(Path(args.train_run))
        if trained is None:
            raise SystemExit(f"error: {args.train_run} is not a finished training run")
    else:
        trained = train(args.train_overrides.split())
    train_run = trained["run_dir"]
    methods = args.methods.split(",")
    shares = args.discovery.split(",")
    per_method: dict[str, list[str]] = {}
    for item in args.method_extra:
        m, o = item.split(":", 1)
        per_method.setdefault(m, []).append(o)
    results: dict[tuple[str, str], dict] = {}
    for share in shares:
        for method in methods:
            over = [f"method={method}", *discovery_overrides(share), *args.extra, *per_method.get(method, [])]
            if method_info(method).dampens:
                over.append("method.importance.cache=false")
            if method != "potion" and not method_info(method).iterative:
                over.append("suspects.enabled=false")  # the ranking is reported for potion; saves a pass per cell
            s = unlearn(train_run, over)
            results[(method, share)] = s
            print(f"{method:>10} {discovery_label(share):>9}: healed={fmt(s['healed'])} "
                  f"acc_drop={fmt(s['acc_drop'], 2)} asr={s['asr']:.3f} seconds={s['unlearn_seconds']:.1f}", flush=True)

    floor = retain_pass_seconds(train_run, discovery_overrides(shares[min(1, len(shares) - 1)]), 256)
    header = ["discovery", *methods]
    rows = []
    for share in shares:
        rows.append([discovery_label(share), *(
            f"{fmt(results[(m, share)]['healed'])} / {fmt(results[(m, share)]['acc_drop'], 2)}" for m in methods)])
    means = []
    for m in methods:
        h = [results[(m, s)]["healed"] for s in shares if results[(m, s)]["healed"] is not None]
        d = [results[(m, s)]["acc_drop"] for s in shares if results[(m, s)]["acc_drop"] is not None]
        means.append(f"**{fmt(statistics.mean(h) if h else None)} / {fmt(statistics.mean(d) if d else None, 2)}**")
    rows.append(["mean", *means])
    detail_header = ["method", "discovery", "n_f", "clean_acc", "asr", "healed", "acc_drop", "seconds", "notes"]
    detail = []
    for m in methods:
        for share in shares:
            s = results[(m, share)]
            note = f"PTN steps {s.get('ptn_steps'):.0f}" if s.get("ptn_steps") else ""
            if s.get("ptn_note"):
                note += " (rho not met)"
            if s.get("suspect_ap") is not None:
                note += (f"; suspects P/R/AP {fmt(s.get('suspect_precision'), 2)}/{fmt(s.get('suspect_recall'), 2)}"
                         f"/{fmt(s.get('suspect_ap'), 2)}")
            detail.append([m, discovery_label(share), s["n_f"], f"{s['clean_acc']:.4f}", f"{s['asr']:.4f}",
                           fmt(s["healed"]), fmt(s["acc_drop"], 2), f"{s['unlearn_seconds']:.1f}", note])
    ptn_times = [results[(m, s)]["unlearn_seconds"] for m in methods if m == "potion" for s in shares]
    retrain_times = [results[(m, s)]["unlearn_seconds"] for m in methods if m == "retrain" for s in shares]
    timing = [f"- Floor (one forward+backward pass over the retain set, batch 256, CE): {floor:.1f} s."]
    if ptn_times:
        timing.append(f"- potion wall time: {min(ptn_times):.1f}-{max(ptn_times):.1f} s, i.e. "
                      f"{min(ptn_times) / floor:.2f}-{max(ptn_times) / floor:.2f}x the floor.")
    if ptn_times and retrain_times:
        timing.append(f"- retrain wall time: {statistics.mean(retrain_times):.1f} s on average, "
                      f"{statistics.mean(retrain_times) / statistics.mean(ptn_times):.1f}x potion's.")
    body = "\n\n".join([
        f"### {args.title}",
        f"Poisoned model: `{train_run}` (clean_acc {trained['clean_acc']:.4f}, asr {trained['asr']:.4f}, "
        f"n_p {trained['n_p']}). Cells: healed / acc_drop (percentage points). One seed.",
        f"Command: `{command_line()}`",
        markdown_table(header, rows), "\n".join(timing), "<details><summary>Per-cell detail</summary>\n",
        markdown_table(detail_header, detail), "</details>",
    ])
    write_section(Path(args.doc), args.section, body)
    print(body)


if __name__ == "__main__":
    main()
