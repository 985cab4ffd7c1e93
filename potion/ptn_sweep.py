"""PTN as a Hydra multirun: what the ``ptn`` sweeper (``hydra_plugins/potion_ptn``) and its jobs run.

The sweeper process calls :func:`prepare` once: it computes the importances with the method's own code
(so the content-addressed cache gets exactly the entry every job will look up) and a0. Then it
launches unlearn.py jobs, told apart by ``ptn_job.role`` (see :func:`job_overrides`):

- ``candidate``: :func:`run_candidate` reads the cached importances, dampens at
  ``method.ptn.fixed_step`` and measures the forget accuracy only (no test-set evaluation, nothing
  written; the sweeper records its values as a child MLflow run, :func:`log_candidate`);
- ``final``: the full ``run_unlearning`` at the chosen step, its MLflow run a child of the sweep's.

Without a role, :func:`dispatch` is plain ``run_unlearning``, so unlearn.py behaves as before.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from potion.config import model_kwargs, to_dict
from potion.errors import ConfigError
from potion.unlearning.ptn import Candidate, PTNSchedule, default_s_start

log = logging.getLogger("potion.ptn_sweep")

JOB_KEY = "ptn_job"  # config node the sweeper adds to its jobs: {role, parent_run_id}
CANDIDATE = "candidate"
FINAL = "final"
ROLES = (CANDIDATE, FINAL)
SWEEPER_KEYS = ("method.ptn.fixed_step", JOB_KEY)  # set by the sweeper per job, never by the user


# --------------------------------------------------------------------------- what the sweeper launches


def round_steps(round_idx: int, batch_size: int, max_steps: int) -> list[int]:
    """The candidate steps k of one round: a block of ``batch_size`` consecutive steps below max_steps."""
    lo = round_idx * batch_size
    return list(range(lo, min(lo + batch_size, max_steps)))


def num_rounds(batch_size: int, max_steps: int) -> int:
    """How many rounds cover all max_steps candidates."""
    return -(-max_steps // batch_size)


def job_overrides(step: int, role: str, parent_run_id: str | None) -> list[str]:
    """The overrides that turn an unlearn.py run into one of the sweeper's jobs."""
    if role not in ROLES:
        raise ValueError(f"unknown PTN job role {role!r}")
    out = [f"method.ptn.fixed_step={int(step)}", f"++{JOB_KEY}.role={role}"]
    if parent_run_id:
        out.append(f"++{JOB_KEY}.parent_run_id='{parent_run_id}'")  # quoted: a hex id can read as a number
    return out


def candidate_of(ret: dict[str, Any]) -> Candidate:
    """A candidate job's return value as the search's Candidate."""
    return Candidate(int(ret["step"]), float(ret["s"]), float(ret["percentile"]), float(ret["alpha"]),
                     float(ret["dampened_share"]), float(ret["forget_acc"]))


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
    """unlearn.py's work: a PTN candidate, the sweep's final run, or (no role) an ordinary run."""
    from potion.unlearn_pipeline import run_unlearning

    role = job_role(cfg)
    if role is None:
        return run_unlearning(cfg)
    if role not in ROLES:
        raise ConfigError(f"{JOB_KEY}.role={role}: choose one of {list(ROLES)} (set by the ptn sweeper)")
    parent = cfg[JOB_KEY].get("parent_run_id")
    parent = None if parent in (None, "") else str(parent)
    plain = without_job(cfg)
    if role == CANDIDATE:
        return run_candidate(plain)
    return run_unlearning(plain, parent_run_id=parent)


# --------------------------------------------------------------------------- the work


@dataclass
class Loaded:
    """A PTN method's inputs, built the way run_unlearning builds them."""

    task: Any  # UnlearnTask
    method_fn: Any
    method_args: dict[str, Any]
    run: Any  # TrainedRun


def check_ptn_config(cfg: DictConfig) -> None:
    """The configured method must search with PTN and use the importance cache the jobs share."""
    name = str(cfg.method.get("name"))
    if cfg.method.get("ptn") is None:
        raise ConfigError(f"method={name} has no PTN search; the ptn sweeper runs potion, assd or lfssd "
                          "(use unlearn.py for other methods)")
    imp = cfg.method.get("importance")
    if imp is not None and not bool(imp.get("cache", True)):
        raise ConfigError("method.importance.cache=false: the ptn sweeper's jobs read the importances from the "
                          "cache; drop the override (or use unlearn.py for an uncached run)")


# One entry per process: a sweep's jobs share the trained run, the poisoned data and the discovery, so a
# worker (or the basic launcher's single process) loads them once instead of once per candidate.
_INPUTS: dict[str, tuple[Any, Any, Any]] = {}
INPUT_KEYS = ("train_run", "train", "discovery", "seed", "logger")  # the config keys that select them


def _inputs(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """(trained run, poisoned data, discovery) for this job, reused from an earlier job of the same sweep."""
    from potion.config import identity_hash
    from potion.data.poisoned import load_data, poison
    from potion.discovery import discover
    from potion.runs import load_trained_run
    from potion.unlearn_pipeline import resolve_train_run

    spec = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in ((k, cfg.get(k)) for k in INPUT_KEYS)}
    summary = Path(str(spec["train_run"])) / "summary.json"  # a re-trained run folder is loaded afresh
    spec["summary_mtime"] = summary.stat().st_mtime_ns if spec["train_run"] and summary.is_file() else None
    key = identity_hash(spec)
    if key not in _INPUTS:
        run = load_trained_run(resolve_train_run(cfg.get("train_run"), cfg.get("logger"), cfg.get("train")))
        d = cfg.discovery
        discovery = discover(run.plan, share=d.get("share"), count=d.get("count"),
                             seed=int(d.get("seed", cfg.seed)))
        _INPUTS.clear()
        _INPUTS[key] = (run, poison(load_data(run.cfg.dataset), run.plan), discovery)
    return _INPUTS[key]


def warm_worker(cfg: dict[str, Any]) -> int:
    """Run in a launcher's worker before its first job: import torch and the methods, load the job inputs.

    The ptn sweeper calls it through a joblib launcher while it computes the importances itself, so the
    worker start-up (interpreter, imports, data) overlaps that work instead of delaying the first round.
    """
    from potion.unlearning.registry import load_builtin_methods

    load_builtin_methods()
    _inputs(OmegaConf.create(cfg))
    return os.getpid()


def _load(cfg: DictConfig, step: int) -> Loaded:
    from potion.models import build_model
    from potion.unlearn_pipeline import resolve_device
    from potion.unlearning.registry import get_method
    from potion.unlearning.task import UnlearnTask

    check_ptn_config(cfg)
    method_fn = get_method(str(cfg.method.name))
    run, data, discovery = _inputs(cfg)
    torch.manual_seed(int(cfg.seed))
    device = resolve_device(cfg.get("trainer"))
    model = run.build_model(data.num_classes, data.channels).to(device).eval()
    task = UnlearnTask(model=model, data=data, discovery=discovery, device=device, seed=int(cfg.seed),
                       model_factory=lambda: build_model(run.cfg.model.name, data.num_classes, data.channels,
                                                         **model_kwargs(run.cfg.model)),
                       train_cfg=to_dict(run.cfg.train))
    args = {k: v for k, v in to_dict(cfg.method).items() if k != "name"}
    args["ptn"] = {**args.get("ptn", {}), "fixed_step": int(step)}
    return Loaded(task, method_fn, args, run)


def _threads() -> int:
    """torch threads for a job: $POTION_THREADS, else joblib's per-worker share ($OMP_NUM_THREADS), else all."""
    from potion.schedule import cpu_threads

    if os.environ.get("POTION_THREADS"):
        return cpu_threads()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    return int(omp) if omp.isdigit() and int(omp) > 0 else cpu_threads()


def schedule_of(cfg: DictConfig, n_f: int, num_train: int) -> PTNSchedule:
    """The candidate grid exactly as run_ptn builds it from method.ptn."""
    p = cfg.method.ptn
    s_start = p.get("s_start")
    return PTNSchedule(s_start=float(s_start) if s_start is not None else default_s_start(n_f, num_train),
                       s_step=float(p.get("s_step", 1.1)), max_steps=int(p.get("max_steps", 500)),
                       rho=float(p.get("rho", 0.1)))


def prepare(cfg: DictConfig) -> dict[str, Any]:
    """In the sweeper, before any job: importances into the cache (once), a0, the schedule, n_f.

    Runs the configured method at step 0 (its own importance code, so the cache key is the one every
    job computes), which also yields a0 and the step-0 candidate (a cross-check for the jobs).
    """
    check_ptn_config(cfg)
    if cfg.method.ptn.get("fixed_step") is not None:
        raise ConfigError("method.ptn.fixed_step is what the ptn sweeper searches over; drop the override")
    torch.set_num_threads(_threads())
    t0 = time.perf_counter()
    job = _load(cfg, 0)
    out = job.method_fn(job.task, **job.method_args)
    d, importance_seconds = out.diagnostics, float(out.timings.get("importance_seconds", 0.0))
    schedule = schedule_of(cfg, job.task.discovery.n_f, job.task.num_train)
    n_f, n_p, num_train = job.task.discovery.n_f, job.run.plan.count, job.task.num_train
    del job, out
    if torch.cuda.is_available():  # the jobs (maybe on this GPU) need the memory more than the sweeper
        torch.cuda.empty_cache()
    if not math.isclose(float(d["ptn_s"]), schedule.share(0), rel_tol=1e-9):
        raise RuntimeError(f"PTN schedule mismatch: the method's s_0={d['ptn_s']} but the sweeper's is "
                           f"{schedule.share(0)}")
    return {
        "a0": float(d["ptn_a0"]), "threshold": float(d["ptn_threshold"]), "schedule": asdict(schedule),
        "n_f": n_f, "n_p": n_p, "num_train": num_train,
        "method": str(cfg.method.name), "importance_cache_hit": float(d["importance_cache_hit"]),
        "importance_seconds": importance_seconds, "prepare_seconds": time.perf_counter() - t0,
        "step0": {"step": 0, "s": d["ptn_s"], "percentile": d["ptn_percentile"], "alpha": d["ptn_alpha"],
                  "dampened_share": d["ptn_dampened_share"], "forget_acc": d["ptn_forget_acc"]},
    }


def run_candidate(cfg: DictConfig) -> dict[str, Any]:
    """One PTN candidate: cached importances, dampen at method.ptn.fixed_step, forget accuracy only.

    Writes nothing and evaluates nothing on the test set; the sweeper records the returned values as a
    child MLflow run (:func:`log_candidate`), so jobs never open the tracking store (no MLflow import in
    workers, one writer to a sqlite store).
    """
    step = cfg.method.ptn.get("fixed_step")
    if step is None:
        raise ConfigError("a ptn candidate job needs method.ptn.fixed_step (set by the ptn sweeper)")
    check_ptn_config(cfg)
    return _candidate(cfg, int(step))


def log_candidate(cfg: DictConfig, result: dict[str, Any], parent_run_id: str | None) -> str | None:
    """A candidate's child MLflow run under the sweep's parent run (in the sweeper's process); its run id."""
    from potion.tracking import start_tracker

    name, step = str(cfg.method.name), int(result["step"])
    tracker = start_tracker(cfg.get("logger"), experiment="potion", run_name=f"ptn-candidate-{name}-k{step}",
                            tags={"potion.task": "ptn_candidate", "potion.method": name, "potion.ptn_step": step},
                            parent_run_id=parent_run_id)
    method = to_dict(cfg.method)
    method["ptn"] = {**method.get("ptn", {}), "fixed_step": step}
    tracker.log_params({"method": method, "discovery": to_dict(cfg.discovery),
                        "train_run": str(cfg.get("train_run")), "seed": cfg.seed, "step": step})
    tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, (int, float, bool))})
    tracker.finish("FINISHED")
    return tracker.run_id


def _candidate(cfg: DictConfig, step: int) -> dict[str, Any]:
    torch.set_num_threads(_threads())
    t0 = time.perf_counter()
    job = _load(cfg, step)
    out = job.method_fn(job.task, **job.method_args)
    d = out.diagnostics
    if not d["importance_cache_hit"]:
        log.warning("PTN candidate k=%d computed its importances: the sweeper's cache entry was not found (same "
                    "POTION_CACHE_DIR on a shared filesystem and the same device type for sweeper and jobs?)", step)
    return {
        "step": step, "s": float(d["ptn_s"]), "percentile": float(d["ptn_percentile"]),
        "alpha": float(d["ptn_alpha"]), "dampened_share": float(d["ptn_dampened_share"]),
        "forget_acc": float(d["ptn_forget_acc"]), "a0": float(d["ptn_a0"]), "threshold": float(d["ptn_threshold"]),
        "qualifies": bool(d["ptn_reached"]), "importance_cache_hit": float(d["importance_cache_hit"]),
        "importance_seconds": float(out.timings.get("importance_seconds", 0.0)),
        "candidate_seconds": time.perf_counter() - t0,
    }
