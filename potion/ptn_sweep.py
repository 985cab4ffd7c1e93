"""PTN as a Hydra multirun, the sweeper's side: what the ``ptn`` sweeper (``hydra_plugins/potion_ptn``)
launches, how its jobs are told apart, and the child runs it records. This module never imports torch,
so the sweeper can run where no tensor work happens (a cluster login node, or a joblib parent whose
workers do it); the jobs' work is in :mod:`potion.ptn_jobs`.

The sweeper launches unlearn.py jobs told apart by ``ptn_job.role`` (see :func:`job_overrides`):

- ``prepare``: once, first: the importances into the content-addressed cache (the method's own code,
  so the key is the one every later job looks up), a0 and the candidate grid
  (:func:`potion.ptn_jobs.prepare`). As a launcher job it runs where the candidates run, so the cache
  entry is for their device;
- ``candidate``: reads the cached importances once, then for each of its steps k (``ptn_job.steps``)
  dampens the model and measures the forget accuracy only (nothing written; the sweeper records each
  step's values as a child MLflow run, :func:`log_candidate`);
- ``final``: the full ``run_unlearning`` at the chosen step, its MLflow run a child of the sweep's.

Without a role, :func:`dispatch` is plain ``run_unlearning``, so unlearn.py behaves as before.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, open_dict

from potion.config import to_dict
from potion.errors import ConfigError
from potion.unlearning.ptn_candidates import Candidate

if TYPE_CHECKING:
    from potion.tracking import Tracker

JOB_KEY = "ptn_job"  # config node the sweeper adds to its jobs: {role, parent_run_id}
PREPARE = "prepare"
CANDIDATE = "candidate"
FINAL = "final"
ROLES = (PREPARE, CANDIDATE, FINAL)
PTN_METHODS = ("potion", "assd", "lfssd")  # one PTN search over one importance pair: what the sweeper splits
SWEEPER_KEYS = ("method.ptn.fixed_step", JOB_KEY)  # set by the sweeper per job, never by the user
INPUT_KEYS = ("train_run", "train", "discovery", "seed", "logger")  # the config keys that select a job's inputs
TRACKING_KEY = "ptn_tracking"  # in a final job's return value: its recorded tracking calls and final status


# --------------------------------------------------------------------------- what the sweeper launches


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

    ``step``: none for ``prepare``, the steps k a ``candidate`` job evaluates (one or a list), the chosen
    k for ``final``. ``run_id`` (final job only): the MLflow run the sweeper created for it; the job then
    records its tracking calls and returns them (:data:`TRACKING_KEY`) instead of opening the store.
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


def candidate_of(ret: dict[str, Any]) -> Candidate:
    """A candidate job's return value as the search's Candidate."""
    return Candidate(int(ret["step"]), float(ret["s"]), float(ret["percentile"]), float(ret["alpha"]),
                     float(ret["dampened_share"]), float(ret["forget_acc"]))


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


def log_candidate(parent: Tracker, cfg: DictConfig, result: dict[str, Any]) -> str | None:
    """A candidate's child MLflow run under the sweep's parent run (in the sweeper's process); its run id.

    Written through the parent's tracker (one client, one writer for a sqlite store) from the values
    the job returned, so candidate jobs never open the store.
    """
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


# --------------------------------------------------------------------------- dispatch (unlearn.py)


def job_role(cfg: DictConfig) -> str | None:
    """The PTN sweeper role of this unlearn.py run (None for an ordinary run)."""
    node = cfg.get(JOB_KEY)
    role = node.get("role") if node is not None else None
    return None if role is None else str(role)


def without_job(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` without the sweeper's job node (so it does not enter the run's identity hash)."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.pop(JOB_KEY, None)
    return out


def dispatch(cfg: DictConfig) -> dict[str, Any]:
    """unlearn.py's work: the sweep's prepare job, a PTN candidate, the final run, or (no role) a plain run."""
    from potion import ptn_jobs
    from potion.unlearn_pipeline import run_unlearning

    role = job_role(cfg)
    if role is None:
        return run_unlearning(cfg)
    if role not in ROLES:
        raise ConfigError(f"{JOB_KEY}.role={role}: choose one of {list(ROLES)} (set by the ptn sweeper)")
    parent, run_id = (None if v in (None, "") else str(v) for v in (cfg[JOB_KEY].get("parent_run_id"),
                                                                     cfg[JOB_KEY].get("run_id")))
    plain = without_job(cfg)
    if role == PREPARE:
        return ptn_jobs.prepare(plain)
    if role == CANDIDATE:
        return ptn_jobs.run_candidates(plain, cfg[JOB_KEY].get("steps"))
    from potion.tracking import RecordingTracker, tracking_enabled

    if not tracking_enabled(cfg.get("logger")):  # logger=none: nothing to record
        return run_unlearning(plain, parent_run_id=parent)
    # Recorded also when the sweeper could not create its run (run_id None: the server went away): the run
    # folder is written whatever the tracking state, and the sweeper keeps the calls for a later replay.
    recorder = RecordingTracker(run_id)
    summary = run_unlearning(plain, tracker=recorder)
    return {**summary, TRACKING_KEY: {"calls": recorder.calls, "status": recorder.status}}


def warm_worker(cfg: dict[str, Any]) -> int:
    """A joblib worker's warm-up (see :func:`potion.ptn_jobs.warm_up`); a torch-free handle the sweeper can
    pass to joblib without importing the jobs' module itself."""
    from potion.ptn_jobs import warm_up

    return warm_up(cfg)
