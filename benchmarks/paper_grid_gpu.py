"""The paper's CIFAR-10 grid, as much of it as fits one GPU loan (10 minutes on one H100/H200).

    bash benchmarks/paper_grid_gpu.sh                 # on the lent machine: carried wheels + data, results in $OUT
    python benchmarks/paper_grid_gpu.py --tiny        # the same stages on CPU with the quickstart setting (timings)

Work is taken in the order the results matter (issue 14):
  1. poison 100 / 500 / 1000 at seed 0: the three paper_cifar10 models;
  2. potion, ssd, lfssd, assd at 1 sample, 10 %, 50 %, 100 % discovery, and retrain at 10 %;
  3. the remaining discovery shares (20-40 %, 60-90 %);
  4. seeds 1 and 2 (their models and the cells of stage 2).
Before each step the script projects its duration from what the same kind of step took so far (or from
the figures measured on an H200 before: 42 s per training, 6 s per potion cell, a retrain = a training) and
skips it when it would end after ``--budget-s``. Every run is logged to ``<out>/mlflow.db``; at the end
``python -m potion.report`` writes the paper-style tables and figures to ``<out>/report`` and the
timings and skipped steps go to ``<out>/paper_grid.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import command_line, discovery_overrides, train, unlearn

PTN_METHODS = ("potion", "ssd", "lfssd", "assd")
FIRST_SHARES = ("1", "0.1", "0.5", "1.0")
OTHER_SHARES = ("0.2", "0.3", "0.4", "0.6", "0.7", "0.8", "0.9")
POISON = (100, 500, 1000)
# seconds measured on one H200 (docs/results.md): the plan before anything here was timed
PRIOR = {"train": 42.0, "cell": 6.0, "retrain": 42.0}


@dataclass
class Step:
    """One unit of work: a training run or an unlearning cell."""

    kind: str  # train | cell | retrain
    seed: int
    poison: int
    method: str = ""
    share: str = ""

    @property
    def name(self) -> str:
        if self.kind == "train":
            return f"train n_p={self.poison} seed={self.seed}"
        return f"{self.method} {self.share} n_p={self.poison} seed={self.seed}"


def plan() -> Iterator[Step]:
    """Every step of the grid, most important first."""
    for n_p in POISON:
        yield Step("train", 0, n_p)
    for n_p in POISON:
        for share in FIRST_SHARES:
            for m in PTN_METHODS:
                yield Step("cell", 0, n_p, m, share)
        yield Step("retrain", 0, n_p, "retrain", "0.1")
    for n_p in POISON:
        for share in OTHER_SHARES:
            for m in PTN_METHODS:
                yield Step("cell", 0, n_p, m, share)
    for seed in (1, 2):
        for n_p in POISON:
            yield Step("train", seed, n_p)
            for share in FIRST_SHARES:
                for m in PTN_METHODS:
                    yield Step("cell", seed, n_p, m, share)
            yield Step("retrain", seed, n_p, "retrain", "0.1")


@dataclass
class Clock:
    """Projects a step's duration from the steps of its kind done so far."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)
    seen: dict[str, list[float]] = field(default_factory=dict)

    def expected(self, kind: str) -> float:
        done = self.seen.get(kind)
        return max(done) if done else PRIOR[kind]

    def fits(self, kind: str) -> bool:
        return time.perf_counter() - self.start + self.expected(kind) <= self.budget_s

    def record(self, kind: str, seconds: float) -> None:
        self.seen.setdefault(kind, []).append(seconds)


def train_overrides(args: argparse.Namespace, n_p: int, seed: int, logger: list[str]) -> list[str]:
    if args.tiny:
        return ["experiment=quickstart", "train.epochs=3", f"poison.count={n_p // 20}", "poison.fraction=null",
                f"seed={seed}", *logger]
    return ["experiment=paper_cifar10", "dataset=cifar10_jpg", f"dataset.path={args.data}", "trainer=gpu",
            f"poison.count={n_p}", f"seed={seed}", *logger]


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logger = [f"logger.tracking_uri=sqlite:///{out.resolve()}/mlflow.db", "logger.experiment=paper_cifar10"]
    trainer = "trainer=cpu" if args.tiny else "trainer=gpu"
    clock = Clock(args.budget_s)
    models: dict[tuple[int, int], str] = {}
    done, skipped = [], []
    for step in plan():
        key = (step.poison, step.seed)
        if (step.kind != "train" and key not in models) or not clock.fits(step.kind):
            skipped.append(step.name)
            continue
        t0 = time.perf_counter()
        if step.kind == "train":
            s = train(train_overrides(args, step.poison, step.seed, logger))
            models[key] = s["run_dir"]
            figures = {"clean_acc": s["clean_acc"], "asr": s["asr"]}
        else:
            over = [f"method={step.method}", *discovery_overrides(step.share), trainer, "save_weights=false",
                    f"seed={step.seed}", *logger]
            s = unlearn(models[key], over)
            figures = {k: s.get(k) for k in ("healed", "acc_drop", "asr", "unlearn_seconds")}
        seconds = time.perf_counter() - t0
        clock.record(step.kind, seconds)
        done.append({"step": step.name, "seconds": round(seconds, 2), **figures})
        print(f"{time.perf_counter() - clock.start:7.1f} s  {step.name}: {figures} ({seconds:.1f} s)", flush=True)
    report = subprocess.run([sys.executable, "-m", "potion.report", "--tracking-uri",
                             f"sqlite:///{out.resolve()}/mlflow.db", "--experiment", "paper_cifar10", "--out",
                             str(out / "report")], capture_output=True, text=True)
    print(report.stdout[-2000:] + report.stderr[-2000:], flush=True)
    return {"command": command_line(), "device": device_name(), "budget_s": args.budget_s,
            "wall_seconds": time.perf_counter() - clock.start, "done": done, "skipped": skipped,
            "mean_seconds": {k: sum(v) / len(v) for k, v in clock.seen.items()}}


def projection(budget_s: float, per_kind: dict[str, float]) -> dict[str, Any]:
    """What the budget buys with these per-step durations: the steps that fit, in order, and the rest."""
    elapsed, fits, rest = 0.0, [], []
    for step in plan():
        if elapsed + per_kind[step.kind] <= budget_s:
            elapsed += per_kind[step.kind]
            fits.append(step.name)
        else:
            rest.append(step.name)
    return {"seconds": elapsed, "fits": fits, "left_out": rest}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10-jpg.tar.gz")
    ap.add_argument("--out", default="runs/paper_grid")
    ap.add_argument("--budget-s", type=float, default=540.0, help="stop starting steps that would end after this")
    ap.add_argument("--tiny", action="store_true", help="quickstart setting on CPU (times every stage)")
    ap.add_argument("--plan", action="store_true", help="print what fits the budget with the H200 timings; run nothing")
    args = ap.parse_args()
    if args.plan:
        p = projection(args.budget_s, PRIOR)
        print(f"{len(p['fits'])} steps fit in {p['seconds']:.0f} s of {args.budget_s:.0f} s (per step: {PRIOR}); "
              f"first left out: {p['left_out'][:1]}")
        return
    result = run(args)
    path = Path(args.out) / "paper_grid.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"done {len(result['done'])} steps, skipped {len(result['skipped'])}; {path}")


if __name__ == "__main__":
    main()
