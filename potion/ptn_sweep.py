"""PTN as a Hydra multirun, the sweeper's side: the search the ``ptn`` sweeper (``hydra_plugins/potion_ptn``) runs
through whatever launcher Hydra is configured with, and the MLflow runs it writes. Never imports torch, so the
sweeper can sit where no tensor work happens (a cluster login node); the jobs' work is :mod:`potion.ptn_jobs`.

PTN's candidates s_k = s_start * s_step^k are fixed in advance, so the search evaluates them in rounds of
``batch_size`` consecutive steps, each round one launch of jobs of ``steps_per_job`` steps. It stops after
the first round that holds a qualifying step (forget_acc <= rho * a0) and takes the smallest qualifying k
there: every earlier step failed in an earlier round, so the answer is the in-process search's (no step
qualifies within max_steps: the last, ``ptn_reached=0``, as in-process). The jobs, told apart by
``ptn_job.role`` (:func:`job_overrides`):

- ``prepare``, once, first: the method at k=0, which computes the importances into the content-addressed
  cache where the candidates run (their device) and measures a0;
- ``candidate``: the cached importances, then for each of its steps the dampened model's forget accuracy;
- ``final``: unlearn.py's full run at the chosen step.

Jobs never open the tracking store, so compute nodes need not reach it: candidates return their values and
the final job its recorded tracking calls, and this process writes them all (one writer for a sqlite store)
as child runs of the sweep's parent run. Calls it cannot deliver (the server went away) are kept in the
final run folder for ``python -m potion.relog``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from potion.config import to_dict
from potion.errors import ConfigError
from potion.io import atomic_write_json
from potion.lifecycle import write_rows_csv
from potion.tracking import RecordingTracker, Tracker, start_tracker
from potion.tracking_runs import MISSING, PENDING, logged_state, record_run_id, replay_command, write_pending
from potion.unlearning.ptn_candidates import Candidate, first_qualifying

log = logging.getLogger(__name__)

JOB_KEY = "ptn_job"  # config node the sweeper adds to its jobs: {role, steps, parent_run_id, run_id}
PREPARE, CANDIDATE, FINAL = "prepare", "candidate", "final"
ROLES = (PREPARE, CANDIDATE, FINAL)
PTN_METHODS = ("potion", "assd", "lfssd")  # one PTN search over one importance pair: what the sweeper splits
SWEEPER_KEYS = ("method.ptn.fixed_step", JOB_KEY)  # set by the sweeper per job, never by the user
TRACKING_KEY = "ptn_tracking"  # in a final job's return value: its recorded tracking calls and final status
# Metrics of the final (healed) run repeated on the parent, so a sweep reads as one row in the MLflow UI.
FINAL_METRICS = ("clean_acc", "asr", "poison_acc", "healed", "acc_drop", "forget_acc", "clean_acc_before",
                 "asr_before")

Launch = Callable[[list[list[str]]], Sequence[Any]]  # job overrides -> Hydra JobReturns, in order


@dataclass(frozen=True)
class SweepSettings:
    """The sweeper's own settings (``hydra.sweeper.*``) and what the parent run records about the command."""

    batch_size: int
    steps_per_job: int
    launcher: str  # the launcher's class name, recorded only
    overrides: dict[str, str]


# --------------------------------------------------------------------------- what the sweeper launches


def check_sizes(batch_size: Any, steps_per_job: Any) -> int:
    """Check ``hydra.sweeper.batch_size`` / ``steps_per_job``; the steps per job (null: the whole round)."""
    for key, value in (("batch_size", batch_size), ("steps_per_job", steps_per_job)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"hydra.sweeper.{key}={value}: must be a positive integer"
                              + (" (candidate steps launched per round)" if key == "batch_size"
                                 else " or null (a whole round per job)"))
    if batch_size is None:
        raise ConfigError("hydra.sweeper.batch_size=null: must be a positive integer")
    return int(steps_per_job or batch_size)


def round_steps(round_idx: int, batch_size: int, max_steps: int) -> list[int]:
    """The candidate steps k of one round: a block of ``batch_size`` consecutive steps below max_steps."""
    lo = round_idx * batch_size
    return list(range(lo, min(lo + batch_size, max_steps)))


def num_rounds(batch_size: int, max_steps: int) -> int:
    """How many rounds cover all max_steps candidates."""
    return -(-max_steps // batch_size)


def job_chunks(steps: list[int], steps_per_job: int) -> list[list[int]]:
    """A round's steps as the candidate jobs that evaluate them: consecutive blocks of ``steps_per_job``."""
    if steps_per_job < 1:
        raise ValueError(f"steps_per_job={steps_per_job}: must be >= 1")
    return [steps[i:i + steps_per_job] for i in range(0, len(steps), steps_per_job)]


def job_overrides(step: int | Sequence[int] | None, role: str, parent_run_id: str | None,
                  run_id: str | None = None) -> list[str]:
    """The overrides that turn an unlearn.py run into one of the sweeper's jobs.

    ``step``: none for ``prepare``, the steps k a ``candidate`` job evaluates (one or a list), the chosen k
    for ``final``, whose ``run_id`` is the MLflow run the sweeper created for it.
    """
    if role not in ROLES:
        raise ValueError(f"unknown PTN job role {role!r}")
    if (step is None) != (role == PREPARE):
        raise ValueError(f"a {role} job {'takes no' if role == PREPARE else 'needs a'} step k")
    if run_id and role != FINAL:
        raise ValueError("only the final job logs an MLflow run of its own")
    if role == CANDIDATE:
        steps = [int(step)] if isinstance(step, int) else [int(k) for k in step]  # type: ignore[union-attr]
        if not steps:
            raise ValueError("a candidate job needs at least one step k")
        out = [f"++{JOB_KEY}.steps=[{','.join(map(str, steps))}]"]
    else:
        out = [] if step is None else [f"method.ptn.fixed_step={int(step)}"]  # type: ignore[arg-type]
    out.append(f"++{JOB_KEY}.role={role}")
    for key, value in (("parent_run_id", parent_run_id), ("run_id", run_id)):
        if value:
            out.append(f"++{JOB_KEY}.{key}='{value}'")  # quoted: a hex id can read as a number
    return out


def job_role(cfg: DictConfig) -> str | None:
    """The PTN sweeper role of this unlearn.py run (None for an ordinary run)."""
    node = cfg.get(JOB_KEY)
    role = node.get("role") if node is not None else None
    return None if role is None else str(role)


def check_ptn_config(cfg: DictConfig) -> None:
    """The configured method must be one PTN search (no fixed step) using the importance cache the jobs share."""
    name = str(cfg.method.get("name"))
    if name not in PTN_METHODS or cfg.method.get("ptn") is None:
        raise ConfigError(f"method={name}: the ptn sweeper runs the single PTN search of "
                          f"{', '.join(PTN_METHODS)} (use unlearn.py for other methods)")
    if cfg.method.ptn.get("fixed_step") is not None:
        raise ConfigError("method.ptn.fixed_step is what the ptn sweeper searches over; drop it")
    imp = cfg.method.get("importance")
    if imp is not None and not bool(imp.get("cache", True)):
        raise ConfigError("method.importance.cache=false: the ptn sweeper's jobs read the importances from the "
                          "cache; drop the override (or use unlearn.py for an uncached run)")


def candidate_of(ret: dict[str, Any]) -> Candidate:
    """A candidate job's return value as the search's Candidate."""
    return Candidate(int(ret["step"]), float(ret["s"]), float(ret["percentile"]), float(ret["alpha"]),
                     float(ret["dampened_share"]), float(ret["forget_acc"]))


# --------------------------------------------------------------------------- the search


def run_sweep(cfg: DictConfig, arguments: list[str], launch: Launch, settings: SweepSettings, sweep_dir: Path
              ) -> list[Sequence[Any]]:
    """The PTN search as launches of jobs; every launch's JobReturns, the final job's last."""
    started = time.perf_counter()
    method = str(cfg.method.name)
    returns: list[Sequence[Any]] = []

    def run(jobs: list[list[str]]) -> list[Any]:
        returns.append(launch([[*arguments, *job] for job in jobs]))
        return [r.return_value for r in returns[-1]]  # re-raises a failed job's error

    with start_tracker(cfg.get("logger"), experiment="potion", run_name=f"ptn-sweep-{method}",
                       tags={"potion.task": "ptn_sweep", "potion.method": method, "potion.launcher": settings.launcher,
                             "potion.sweep_dir": str(sweep_dir)}) as parent:
        parent.log_params({"override": settings.overrides, "sweeper": {
            "batch_size": settings.batch_size, "launcher": settings.launcher, "steps_per_job": settings.steps_per_job}})
        prep = run([job_overrides(None, PREPARE, parent.run_id)])[0]
        _log_prepare(cfg, parent, prep)
        evaluated, chosen = _rounds(cfg, run, parent, settings, prep)
        reached = chosen is not None
        if chosen is None:  # as the in-process search: keep the last step
            chosen = max(evaluated, key=lambda c: c.step)
            log.warning("PTN sweep: rho=%s never met in %d steps; the final run uses the last step k=%d",
                        cfg.method.ptn.rho, len(evaluated), chosen.step)
        summary, pending = _final(cfg, run, parent, chosen.step)
        result = {
            "ptn_chosen_step": chosen.step, "ptn_steps": chosen.step + 1, "ptn_s": chosen.s, "ptn_alpha": chosen.alpha,
            "ptn_percentile": chosen.percentile, "ptn_dampened_share": chosen.dampened_share,
            "ptn_forget_acc": chosen.forget_acc, "ptn_reached": reached, "ptn_steps_evaluated": len(evaluated),
            "ptn_rounds": len(returns) - 2, "ptn_wall_seconds": time.perf_counter() - started,
            "ptn_jobs_recomputed_importance": sum(not c["importance_cache_hit"] for c in _values(returns[1:-1])),
            "ptn_a0": prep["a0"], "ptn_threshold": prep["threshold"],
        }
        parent.log_metrics({**result, **{k: summary.get(k) for k in FINAL_METRICS}})
        parent.set_tags({"potion.final_run_id": summary.get("mlflow_run_id"),
                         "potion.final_run_dir": summary.get("run_dir"),
                         "potion.final_reused": bool(summary.get("reused", False))})
        for path in _write_outputs(cfg, sweep_dir, result, evaluated, summary, prep):
            parent.log_artifact(path)
        _warn_tracking_lost(parent, sweep_dir, pending)
    print(f"PTN sweep ({settings.launcher}, rounds of {settings.batch_size}): k={chosen.step} s={chosen.s:.4g} "
          f"alpha={chosen.alpha:.4g} forget_acc {prep['a0']:.4f} -> {chosen.forget_acc:.4f} (threshold "
          f"{prep['threshold']:.4f}, reached={reached}); {len(evaluated)} candidates in {result['ptn_rounds']} "
          f"rounds, {result['ptn_wall_seconds']:.1f} s; sweep folder {sweep_dir}", flush=True)
    return returns


def _values(launches: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Every candidate value the candidate jobs of these launches returned."""
    return [v for results in launches for r in results for v in r.return_value]


def _log_prepare(cfg: DictConfig, parent: Tracker, prep: dict[str, Any]) -> None:
    parent.log_params({"method": str(cfg.method.name), "n_f": prep["n_f"], "n_p": prep["n_p"],
                       "ptn": {**_schedule(cfg, prep), "threshold": prep["threshold"]}})
    parent.log_metrics({"ptn_a0": prep["a0"], "ptn_threshold": prep["threshold"],
                        "importance_seconds": prep["importance_seconds"], "prepare_seconds": prep["prepare_seconds"],
                        "prepare_importance_cache_hit": prep["importance_cache_hit"]})
    log.info("PTN sweep: a0=%.4f, threshold=%.4f, up to %d steps", prep["a0"], prep["threshold"],
             int(cfg.method.ptn.max_steps))


def _schedule(cfg: DictConfig, prep: dict[str, Any]) -> dict[str, Any]:
    """The searched grid: the config's, with s_start as the method used it (s_0; a default depends on n_f)."""
    p = cfg.method.ptn
    return {"s_start": prep["s"], "s_step": float(p.s_step), "max_steps": int(p.max_steps), "rho": float(p.rho)}


def _rounds(cfg: DictConfig, run: Callable[[list[list[str]]], list[Any]], parent: Tracker, settings: SweepSettings,
            prep: dict[str, Any]) -> tuple[list[Candidate], Candidate | None]:
    """Launch rounds of candidate jobs until one holds a qualifying step; (evaluated, the chosen one or None)."""
    evaluated: list[Candidate] = []
    max_steps = int(cfg.method.ptn.max_steps)
    for r in range(num_rounds(settings.batch_size, max_steps)):
        steps = round_steps(r, settings.batch_size, max_steps)
        log.info("PTN round %d: steps %d..%d", r + 1, steps[0], steps[-1])
        values = [v for job in run([job_overrides(c, CANDIDATE, parent.run_id)
                                    for c in job_chunks(steps, settings.steps_per_job)]) for v in job]
        if not all(v["importance_cache_hit"] for v in values):
            log.warning("PTN candidates of round %d computed their importances: the prepare job's cache entry was "
                        "not found (same POTION_CACHE_DIR on a shared filesystem and the same device type for all "
                        "jobs?)", r + 1)
        cands = [candidate_of(v) for v in values]
        for v, c in zip(values, cands, strict=True):
            log_candidate(parent, cfg, v)
            parent.log_metrics({f"traj_{k}": x for k, x in asdict(c).items() if k != "step"}, step=c.step)
        evaluated.extend(cands)
        chosen = first_qualifying(cands, prep["threshold"])
        if chosen is not None:
            return evaluated, chosen
    return evaluated, None


def _write_outputs(cfg: DictConfig, sweep_dir: Path, result: dict[str, Any], evaluated: list[Candidate],
                   summary: dict[str, Any], prep: dict[str, Any]) -> list[Path]:
    """The sweep folder's ptn_trajectory.csv and ptn_sweep.json (the whole record)."""
    rows = [asdict(c) for c in sorted(evaluated, key=lambda c: c.step)]
    record = {**result, "schedule": _schedule(cfg, prep), "n_f": prep["n_f"], "n_p": prep["n_p"],
              "method": str(cfg.method.name), "final_run_dir": summary.get("run_dir"),
              "final_mlflow_run_id": summary.get("mlflow_run_id"),
              "final": {k: summary.get(k) for k in FINAL_METRICS}, "trajectory": rows}
    return [write_rows_csv(sweep_dir / "ptn_trajectory.csv", rows), atomic_write_json(sweep_dir / "ptn_sweep.json",
                                                                                      record)]


# --------------------------------------------------------------------------- the jobs' runs, written here


def log_candidate(parent: Tracker, cfg: DictConfig, result: dict[str, Any]) -> str | None:
    """A candidate's child run under the sweep's parent run, from the values its job returned; its run id."""
    name, step = str(cfg.method.name), int(result["step"])
    child = parent.child(run_name=f"ptn-candidate-{name}-k{step}",
                         tags={"potion.task": "ptn_candidate", "potion.method": name, "potion.ptn_step": step})
    method = to_dict(cfg.method)
    method["ptn"] = {**method.get("ptn", {}), "fixed_step": step}
    child.log_params({"method": method, "discovery": to_dict(cfg.discovery),
                      "train_run": str(cfg.get("train_run")), "seed": cfg.seed, "step": step})
    child.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float, bool))})
    child.finish("FINISHED")
    return child.run_id


def _final(cfg: DictConfig, run: Callable[[list[list[str]]], list[Any]], parent: Any, step: int
           ) -> tuple[dict[str, Any], Path | None]:
    """The final job at ``step``, its recorded tracking calls replayed into a child run created for it here;
    (its summary, its run folder when those calls wait there for ``potion.relog``).

    A reused final run that the store holds gets no new child run (the placeholder is deleted and the summary
    names the earlier run); one the store lacks is logged into it.
    """
    method = str(cfg.method.name)
    with parent.child(f"unlearn-{method}", tags={"potion.task": "unlearn", "potion.method": method}) as child:
        summary = run([job_overrides(step, FINAL, parent.run_id, run_id=child.run_id)])[0]
        record = summary.pop(TRACKING_KEY, None)
        if record is None or (summary.get("reused") and _already_logged(parent, summary)):
            child.discard()
            return summary, None
        run_dir = Path(str(summary["run_dir"]))
        if child.run_id is not None:
            RecordingTracker.replay(record["calls"], child)
            child.finish(record["status"] or "FINISHED")
        if child.run_id is not None and not getattr(child, "failed", False):
            (run_dir / PENDING).unlink(missing_ok=True)
            if summary.get("mlflow_run_id") != child.run_id:
                summary = {**record_run_id(run_dir, summary, child.run_id), "reused": summary.get("reused", False)}
            return summary, None
    write_pending(run_dir, tracking_uri=str(parent.tracking_uri), experiment=str((cfg.get("logger") or {}).get(
        "experiment") or "potion"), run_name=f"unlearn-{method}", parent_run_id=parent.run_id,
        calls=record["calls"], status=record["status"])
    return summary, run_dir


def _already_logged(parent: Any, summary: dict[str, Any]) -> bool:
    """Whether the store holds a reused final run (or cannot be asked: then nothing is logged again)."""
    if getattr(parent, "client", None) is None or getattr(parent, "offline", False):
        return True
    return logged_state(parent.client, str(parent.experiment_id), Path(str(summary["run_dir"])), summary,
                        "unlearn") != MISSING


def _warn_tracking_lost(parent: Any, sweep_dir: Path, pending: Path | None) -> None:
    """After a sweep whose tracking server went away: where the results are, and how to log them later."""
    if pending is None and not getattr(parent, "offline", False):
        return
    text = (f"warning: the MLflow tracking server {parent.tracking_uri} went away during the sweep; its results are "
            f"on disk (sweep folder {sweep_dir}: ptn_sweep.json, ptn_trajectory.csv")
    if pending is not None:
        text += (f"; final run folder {pending}). Once the server is back, log the final run with: "
                 f"{replay_command(pending, parent.tracking_uri)}")
    else:
        text += ")"
    print(text, file=sys.stderr, flush=True)
