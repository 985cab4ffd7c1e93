"""PTN as a Hydra multirun, the sweeper's side: the search the ``ptn`` sweeper (``hydra_plugins/potion_ptn``) runs
through whatever launcher Hydra is configured with. Never imports torch, so the sweeper can sit where no tensor
work happens (a cluster login node); the jobs' work is :mod:`potion.sweep.jobs`, what the two say to each other
:mod:`potion.sweep.protocol`, the MLflow runs :mod:`potion.sweep.records`, the console lines
:mod:`potion.sweep.console`.

PTN's candidates s_k = s_start * s_step^k are fixed in advance, so the search evaluates them in rounds of
``batch_size`` consecutive steps, each round one launch of jobs of ``steps_per_job`` steps. It stops after
the first round that holds a qualifying step (forget_acc <= rho * a0) and takes the smallest qualifying k
there: every earlier step failed in an earlier round, so the answer is the in-process search's (no step
qualifies within max_steps: the last, ``ptn_reached=0``, as in-process). The jobs, told apart by
``ptn_job.role``:

- ``prepare``, once, first: the method at k=0, which computes the importances into the content-addressed
  cache where the candidates run (their device) and measures a0;
- ``candidate``: the cached importances, then for each of its steps the dampened model's forget accuracy;
- ``final``: unlearn.py's full run at the chosen step.

Jobs never open the tracking store, so compute nodes need not reach it: candidates return their values and
the final job its recorded tracking calls, and this process writes them all as child runs of the sweep's parent
run. Calls it cannot deliver (the server went away) are kept in the final run folder for ``python -m potion.relog``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from potion.core.io import atomic_write_json
from potion.pipelines.lifecycle import complete_sweep_parent, write_rows_csv
from potion.sweep import console, records
from potion.sweep.protocol import (
    CANDIDATE,
    FINAL,
    PREPARE,
    candidate_of,
    job_chunks,
    job_overrides,
    job_value,
    num_rounds,
    round_steps,
)
from potion.tracking.runs import TRAJECTORY
from potion.tracking.tracker import Tracker
from potion.unlearning.ptn_candidates import Candidate, first_qualifying

log = logging.getLogger(__name__)

Launch = Callable[[list[list[str]]], Sequence[Any]]  # job overrides -> Hydra JobReturns, in order
Run = Callable[[list[list[str]]], list[Any]]  # job overrides -> the jobs' return values, in order


@dataclass(frozen=True)
class SweepSettings:
    """The sweeper's own settings (``hydra.sweeper.*``) and what the parent run records about the command."""

    batch_size: int
    steps_per_job: int
    launcher: str  # the launcher's class name, recorded only
    overrides: dict[str, str]


def run_sweep(cfg: DictConfig, arguments: list[str], launch: Launch, settings: SweepSettings, sweep_dir: Path
              ) -> list[Sequence[Any]]:
    """The PTN search as launches of jobs; every launch's JobReturns, the final job's last.

    A finished sweep of the same config that the store holds (its record and final run folder still on disk)
    is not run again: after the prepare job, nothing is launched or logged, and the sweep folder's
    ``ptn_sweep.json`` points at the earlier parent run (``force=true`` runs it again).
    """
    started = time.perf_counter()
    returns: list[Sequence[Any]] = []

    def run(jobs: list[list[str]]) -> list[Any]:
        returns.append(launch([[*arguments, *job] for job in jobs]))
        return [job_value(r) for r in returns[-1]]  # re-raises a failed job's error

    records.check_tracking(cfg.get("logger"))  # a bad logger config or a dead server: one line before any job
    prep = run([job_overrides(None, PREPARE, None)])[0]
    names = records.sweep_runs(cfg, arguments, prep)
    earlier = None if cfg.get("force") else records.finished_sweep(names)
    if earlier is not None:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(sweep_dir / records.RECORD, earlier)
        console.say(console.reused_line(earlier, names.experiment))
        return returns
    sweeper = {"batch_size": settings.batch_size, "launcher": settings.launcher,
               "steps_per_job": settings.steps_per_job}
    with records.parent_run(names, prep, sweeper, sweep_dir) as parent:
        console.say(console.prepare_line(prep, int(cfg.method.ptn.max_steps)))
        evaluated, chosen = _rounds(cfg, run, parent, settings, prep, names)
        reached = chosen is not None
        if chosen is None:  # as the in-process search: keep the last step
            chosen = max(evaluated, key=lambda c: c.step)
            log.warning("PTN sweep: rho=%s never met in %d steps; the final run uses the last step k=%d",
                        cfg.method.ptn.rho, len(evaluated), chosen.step)
        rows = [asdict(c) for c in sorted(evaluated, key=lambda c: c.step)]
        trajectory = _write_trajectory(sweep_dir, rows, prep["threshold"], f"PTN sweep: {names.unlearn_name}")
        summary, pending = records.final_run(
            parent, names, chosen.step,
            lambda run_id: run([job_overrides(chosen.step, FINAL, parent.run_id, run_id=run_id)])[0], trajectory)
        complete_sweep_parent(parent, cfg, sweep_dir, summary)  # config.yaml, the final run's inputs and address
        result = {
            "ptn_chosen_step": chosen.step, "ptn_steps": chosen.step + 1, "ptn_s": chosen.s, "ptn_alpha": chosen.alpha,
            "ptn_percentile": chosen.percentile, "ptn_dampened_share": chosen.dampened_share,
            "ptn_forget_acc": chosen.forget_acc, "ptn_reached": reached, "ptn_steps_evaluated": len(evaluated),
            "ptn_rounds": len(returns) - 2, "ptn_wall_seconds": time.perf_counter() - started,
            "ptn_jobs_recomputed_importance": _recomputed(returns[1:-1]),
            "ptn_a0": prep["a0"], "ptn_threshold": prep["threshold"],
        }
        record = _write_record(cfg, sweep_dir, {**result, "parent_run_id": parent.run_id, records.SWEEP_KEY: names.key},
                               rows, summary, prep)
        records.log_outcome(parent, result, summary, (*trajectory, record))
        console.warn_tracking_lost(parent, sweep_dir, pending)
    console.say(console.result_line(settings.launcher, settings.batch_size, chosen, prep, result, len(evaluated),
                                    sweep_dir))
    return returns


def _recomputed(launches: Sequence[Sequence[Any]]) -> int:
    """How many candidates of these launches computed their importances (missed the prepare job's cache entry)."""
    return sum(not v["importance_cache_hit"] for results in launches for r in results for v in r.return_value)


def _rounds(cfg: DictConfig, run: Run, parent: Tracker, settings: SweepSettings, prep: dict[str, Any],
            names: records.SweepRuns) -> tuple[list[Candidate], Candidate | None]:
    """Launch rounds of candidate jobs until one holds a qualifying step; (evaluated, the chosen one or None)."""
    evaluated: list[Candidate] = []
    max_steps = int(cfg.method.ptn.max_steps)
    rounds = num_rounds(settings.batch_size, max_steps)
    for r in range(rounds):
        steps = round_steps(r, settings.batch_size, max_steps)
        t0 = time.perf_counter()
        values = [v for job in run([job_overrides(c, CANDIDATE, parent.run_id)
                                    for c in job_chunks(steps, settings.steps_per_job)]) for v in job]
        if not all(v["importance_cache_hit"] for v in values):
            log.warning("PTN candidates of round %d computed their importances: the prepare job's cache entry was "
                        "not found (same POTION_CACHE_DIR on a shared filesystem and the same device type for all "
                        "jobs?)", r + 1)
        cands = [candidate_of(v) for v in values]
        records.log_candidates(parent, names, values, cands)
        evaluated.extend(cands)
        chosen = first_qualifying(cands, prep["threshold"])
        console.say(console.round_line(r + 1, rounds, cands, chosen, prep["threshold"], time.perf_counter() - t0))
        if chosen is not None:
            return evaluated, chosen
    return evaluated, None


def _write_trajectory(sweep_dir: Path, rows: list[dict[str, Any]], threshold: float, title: str) -> tuple[Path, Path]:
    """The sweep folder's ptn_trajectory.csv and its plot (the whole search, as an in-process run draws it)."""
    from potion.reporting.plots import plot_ptn_trajectory  # matplotlib: loaded only when a sweep gets this far

    return (write_rows_csv(sweep_dir / TRAJECTORY, rows),
            plot_ptn_trajectory(rows, threshold, sweep_dir / "ptn_trajectory.png", title=title))


def _write_record(cfg: DictConfig, sweep_dir: Path, result: dict[str, Any], rows: list[dict[str, Any]],
                  summary: dict[str, Any], prep: dict[str, Any]) -> Path:
    """The sweep folder's ptn_sweep.json (the whole record): the answer, the searched grid, the final run."""
    p = cfg.method.ptn
    schedule = {"s_start": prep["s"], "s_step": float(p.s_step), "max_steps": int(p.max_steps), "rho": float(p.rho)}
    record = {**result, "schedule": schedule, "n_f": prep["n_f"], "n_p": prep["n_p"],
              "method": str(cfg.method.name), "final_run_dir": summary.get("run_dir"),
              "final_mlflow_run_id": summary.get("mlflow_run_id"),
              "final": {k: summary.get(k) for k in records.FINAL_METRICS}, "trajectory": rows}
    return atomic_write_json(sweep_dir / records.RECORD, record)
