"""PTN as a Hydra multirun, the jobs' side: unlearn.py's work for each ``ptn_job.role`` the ``ptn`` sweeper sets
(see :mod:`potion.sweep.driver`, :mod:`potion.sweep.protocol`), and a plain unlearning run without one.

Jobs return plain values and never open the tracking store: the sweeper writes every run.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from potion.config.compose import method_arguments, to_dict
from potion.core import progress
from potion.core.errors import ConfigError
from potion.core.schedule import cpu_threads
from potion.data.defender import defender_view
from potion.data.poisoned import load_data, poison
from potion.pipelines.unlearn import make_task, resolve_device, run_unlearning, trained_inputs
from potion.sweep.protocol import (
    CANDIDATE,
    JOB_KEY,
    PREPARE,
    ROLES,
    TRACKING_KEY,
    TRAIN_INFO,
    check_ptn_config,
    job_role,
)
from potion.tracking.tracker import RecordingTracker
from potion.tracking.uris import tracking_enabled
from potion.unlearning.methods import get_method
from potion.unlearning.ptn_candidates import Candidate


def dispatch(cfg: DictConfig) -> Any:
    """unlearn.py's work: the sweep's prepare job, a candidate job, the final run, or (no role) a plain run."""
    role = job_role(cfg)
    if role is None:
        return run_unlearning(cfg)
    if role not in ROLES:
        raise ConfigError(f"{JOB_KEY}.role={role}: choose one of {list(ROLES)} (set by the ptn sweeper)")
    job = cfg[JOB_KEY]
    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.pop(JOB_KEY)  # the sweeper's node stays out of the run's identity hash
    if role in (PREPARE, CANDIDATE):
        if role == CANDIDATE and not job.get("steps"):
            raise ConfigError("a ptn candidate job needs ptn_job.steps (set by the ptn sweeper)")
        with progress.quiet_auto():  # the sweep prints a line per round for these jobs
            return prepare(plain) if role == PREPARE else evaluate_steps(plain, [int(k) for k in job.steps])
    if not tracking_enabled(plain.get("logger")):  # logger=none: nothing to record
        return run_unlearning(plain)
    # Recorded also when the sweeper could not create its run (no run_id: the server went away): the run
    # folder is written whatever the tracking state, and the sweeper keeps the calls for a later replay.
    recorder = RecordingTracker(str(job.run_id) if job.get("run_id") else None)
    summary = run_unlearning(plain, tracker=recorder)
    return {**summary, TRACKING_KEY: {"calls": recorder.calls, "status": recorder.status}}


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's first job: the method at k=0 (its own importance code, so the cache entry it writes is the
    one every later job looks up), which also measures a0; plus what the sweep's runs are named and linked by:
    n_f, n_p and the training run (its config, MLflow run id, config hash and folder)."""
    started = time.perf_counter()
    row, run, discovery = _evaluate(cfg, [0])
    return {**row[0], "n_f": discovery.n_f, "n_p": run.plan.count, "prepare_seconds": time.perf_counter() - started,
            TRAIN_INFO: {"cfg": to_dict(run.cfg), "run_dir": str(Path(run.path).resolve()),
                         "mlflow_run_id": run.summary.get("mlflow_run_id"),
                         "config_hash": run.summary.get("config_hash")}}


def evaluate_steps(cfg: DictConfig, steps: Sequence[int]) -> list[dict[str, Any]]:
    """PTN candidates: the cached importances read once, then for each step k a dampening of the undampened
    model and its forget accuracy; one dict per step, in order. Writes nothing, evaluates no test set."""
    return _evaluate(cfg, steps)[0]


def _evaluate(cfg: DictConfig, steps: Sequence[int]) -> tuple[list[dict[str, Any]], Any, Any]:
    check_ptn_config(cfg)
    torch.set_num_threads(cpu_threads())
    started = time.perf_counter()
    run, discovery = trained_inputs(cfg)
    data = poison(load_data(run.cfg.dataset), run.plan, run.poison_images)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.get("trainer"))
    task = make_task(run.build_model(data.num_classes, data.channels), defender_view(data), discovery, device,
                     int(cfg.seed), run.cfg.model, run.cfg.train, cfg.get("attack"))
    args = method_arguments(cfg.method)
    args["ptn"] = {**args["ptn"], "fixed_step": list(steps)}
    out = get_method(str(cfg.method.name))(task, **args)
    d = out.diagnostics
    threshold = float(d["ptn_threshold"])
    shared = {"a0": float(d["ptn_a0"]), "threshold": threshold,
              "importance_cache_hit": float(d["importance_cache_hit"]),
              "importance_seconds": float(out.timings.get("importance_seconds", 0.0)),
              "candidate_seconds": (time.perf_counter() - started) / len(steps)}
    cands = [Candidate(**{k: row[k] for k in Candidate.__dataclass_fields__}) for row in out.trajectory]
    rows = [{**{k: float(v) for k, v in vars(c).items()}, "step": c.step, "qualifies": c.qualifies(threshold),
             **shared} for c in cands]
    return rows, run, discovery
