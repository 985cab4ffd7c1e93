"""Wall time of the PTN sweep (sweep.py) with Hydra's basic launcher vs joblib, on the quickstart model.

    python benchmarks/ptn_sweep_speed.py            # full PTN grid (s_step 1.1, up to 500 steps)
    python benchmarks/ptn_sweep_speed.py --quick    # compressed grid (s_start 0.01, s_step 1.5): seconds

Trains (or reuses) the quickstart model (digits, the quickstart's ResNet-9, BadNets), then runs the same
sweep with ``hydra/launcher=basic`` (jobs one after another in the sweeper's process) and with
``hydra/launcher=joblib hydra.launcher.n_jobs=N`` (N worker processes), ``--repeat`` times each,
alternating; every run in a fresh temporary folder (own importance cache, sqlite MLflow store, sweep
and output folders, so each pays the importance pass once). Wall time is the whole ``python sweep.py``
process, start-up and exit included. Prints the median wall times, their ratio and whether every run
chose the same step k; exits 1 if they did not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, markdown_table, write_section  # noqa: E402


def train_quickstart() -> Path:
    """The quickstart model's run folder (trained now unless a finished one is there)."""
    sys.path.insert(0, str(ROOT))
    from potion.config.compose import compose_config
    from potion.pipelines.train import run_training

    return Path(run_training(compose_config("train", ["experiment=quickstart", "logger=none"]))["run_dir"]).resolve()


def run_sweep(train_run: Path, overrides: list[str], launcher: list[str], logger: str) -> dict:
    """One ``python sweep.py`` in a fresh folder; its ptn_sweep.json plus the wall time."""
    with tempfile.TemporaryDirectory(prefix="ptn-sweep-bench-") as tmp:
        t = Path(tmp)
        log = ([f"logger.tracking_uri=sqlite:///{t / 'mlflow.db'}"] if logger == "mlflow" else ["logger=none"])
        cmd = [sys.executable, "sweep.py", f"train_run={train_run}", *overrides, *log, f"hydra.sweep.dir={t / 'sweep'}",
               f"out_dir={t / 'final'}", "force=true", *launcher]
        env = {**os.environ, "POTION_CACHE_DIR": str(t / "cache")}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"sweep failed ({' '.join(launcher) or 'basic'}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        record = json.loads((t / "sweep" / "ptn_sweep.json").read_text())
    record["wall"] = wall
    return record


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["wall"])[(len(runs) - 1) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-run", help="a finished training run folder (default: the quickstart model)")
    ap.add_argument("--share", type=float, default=0.2, help="discovery.share")
    ap.add_argument("--rho", type=float, default=0.1, help="method.ptn.rho")
    ap.add_argument("--batch-size", type=int, default=8, help="hydra.sweeper.batch_size (candidates per round)")
    ap.add_argument("--n-jobs", type=int, default=2, help="hydra.launcher.n_jobs for joblib")
    ap.add_argument("--steps-per-job", type=int, help="hydra.sweeper.steps_per_job (default: a round per job)")
    ap.add_argument("--quick", action="store_true", help="compressed PTN grid: s_start=0.01, s_step=1.5")
    ap.add_argument("--logger", choices=("mlflow", "none"), default="mlflow")
    ap.add_argument("--repeat", type=int, default=3,
                    help="sweeps per launcher, alternating basic and joblib; the median wall time is reported")
    ap.add_argument("--section", default="ptn_sweep_speed", help="docs/results.md section ('' = print only)")
    args = ap.parse_args()
    os.chdir(ROOT)

    train_run = Path(args.train_run).resolve() if args.train_run else train_quickstart()
    overrides = ["method=potion", f"discovery.share={args.share}", f"method.ptn.rho={args.rho}",
                 f"hydra.sweeper.batch_size={args.batch_size}"]
    if args.steps_per_job is not None:
        overrides.append(f"hydra.sweeper.steps_per_job={args.steps_per_job}")
    if args.quick:
        overrides += ["method.ptn.s_start=0.01", "method.ptn.s_step=1.5"]
    print(f"PTN sweep on {train_run}: {' '.join(overrides)} (logger={args.logger})", flush=True)
    if args.repeat < 1:
        sys.exit("--repeat must be >= 1")
    launchers = {"basic": ["hydra/launcher=basic"],
                 "joblib": ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={args.n_jobs}"]}
    runs: dict[str, list[dict]] = {name: [] for name in launchers}
    for _ in range(args.repeat):  # alternating, so a slow spell of the machine hits both launchers
        for name, launcher in launchers.items():
            runs[name].append(run_sweep(train_run, overrides, launcher, args.logger))
    basic, joblib = (median_run(runs[name]) for name in launchers)
    for name, r in (("basic", basic), (f"joblib n_jobs={args.n_jobs}", joblib)):
        print(f"{name:<16} wall {r['wall']:7.2f} s   k={r['ptn_chosen_step']} reached={r['ptn_reached']}  "
              f"{r['ptn_steps_evaluated']} candidates in {r['ptn_rounds']} rounds")
    same = basic["ptn_chosen_step"] == joblib["ptn_chosen_step"]
    print(f"ratio basic/joblib: {basic['wall'] / joblib['wall']:.2f}x   same step: {same}")
    same = same and all(r["ptn_chosen_step"] == basic["ptn_chosen_step"] for rs in runs.values() for r in rs)
    rows = [[name, f"{r['wall']:.2f}", " / ".join(f"{x['wall']:.2f}" for x in runs[key]), r["ptn_chosen_step"],
             r["ptn_steps_evaluated"], r["ptn_rounds"]]
            for name, key, r in (("basic", "basic", basic), (f"joblib, n_jobs={args.n_jobs}", "joblib", joblib))]
    title_note = "" if args.steps_per_job is None else f", {args.steps_per_job} step(s) per job"
    shown = train_run.relative_to(ROOT) if train_run.is_relative_to(ROOT) else train_run
    body = "\n\n".join([
        f"### PTN sweep: basic launcher vs joblib (CPU, 2 cores{title_note})",
        f"Command: `{command_line()}` (model `{shown}`; "
        f"{' '.join(overrides)}; logger={args.logger})",
        markdown_table(["launcher", "median wall s", "each run (s)", "chosen k", "candidates", "rounds"], rows),
        f"joblib / basic wall time: **{joblib['wall'] / basic['wall']:.2f}x** (no target: retired); same step: {same}.",
    ])
    if args.section:
        write_section(ROOT / "docs" / "results.md", args.section, body)
    print(body)
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
