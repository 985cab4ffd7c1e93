"""What the ``ptn`` sweeper and its jobs say to each other: the job roles, the overrides that make an unlearn.py
run one of its jobs, the rounds of candidate steps, and the values a job returns. Torch-free: both the sweeper
(:mod:`potion.sweep.driver`) and the jobs (:mod:`potion.sweep.jobs`) read it."""

from __future__ import annotations

import io
from collections.abc import Sequence
from contextlib import redirect_stderr
from typing import Any

from omegaconf import DictConfig

from potion.config.compose import check_node
from potion.config.schema import SweeperConfig
from potion.core.errors import ConfigError
from potion.unlearning.ptn_candidates import Candidate
from potion.unlearning.registry import declared_names

JOB_KEY = "ptn_job"  # config node the sweeper adds to its jobs: {role, steps, parent_run_id, run_id}
PREPARE, CANDIDATE, FINAL = "prepare", "candidate", "final"
ROLES = (PREPARE, CANDIDATE, FINAL)
SWEEPER_KEYS = ("method.ptn.fixed_step", JOB_KEY)  # set by the sweeper per job, never by the user
TRACKING_KEY = "ptn_tracking"  # in a final job's return value: its recorded tracking calls and final status
TRAIN_INFO = "train_run"  # in the prepare job's return value: the training run's config, MLflow id, hash, folder


def check_sizes(batch_size: Any, steps_per_job: Any) -> int:
    """``hydra.sweeper.batch_size`` / ``steps_per_job`` checked by the schema (Hydra's node is not part of the
    checked config); the steps per job (null: a round)."""
    check_node(SweeperConfig, {"batch_size": batch_size, "steps_per_job": steps_per_job}, "hydra.sweeper")
    return int(steps_per_job or batch_size)


def check_ptn_config(cfg: DictConfig) -> None:
    """The configured method must be one PTN search (no fixed step) using the importance cache the jobs share."""
    name = str(cfg.method.get("name"))
    ptn_methods = declared_names(ptn=True)  # one PTN search over one importance pair: what the sweeper splits
    if name not in ptn_methods or cfg.method.get("ptn") is None:
        raise ConfigError(f"method={name}: the ptn sweeper runs the single PTN search of "
                          f"{', '.join(ptn_methods)} (use unlearn.py for other methods)")
    if cfg.method.ptn.get("fixed_step") is not None:
        raise ConfigError("method.ptn.fixed_step is what the ptn sweeper searches over; drop it")
    imp = cfg.method.get("importance")
    if imp is not None and not bool(imp.get("cache", True)):
        raise ConfigError("method.importance.cache=false: the ptn sweeper's jobs read the importances from the "
                          "cache; drop the override (or use unlearn.py for an uncached run)")


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


def job_value(job: Any) -> Any:
    """A job's return value; a failed job's error is raised without Hydra's line naming the job's overrides
    (the sweeper's internal ``++ptn_job.*`` keys): the sweeper prints the error in one line."""
    with redirect_stderr(io.StringIO()):
        return job.return_value


def candidate_of(ret: dict[str, Any]) -> Candidate:
    """A candidate job's return value as the search's Candidate."""
    return Candidate(int(ret["step"]), float(ret["s"]), float(ret["percentile"]), float(ret["alpha"]),
                     float(ret["dampened_share"]), float(ret["forget_acc"]))
