"""PTN as a Hydra multirun, the jobs' side: the work of the ``prepare`` and ``candidate`` jobs that the
``ptn`` sweeper launches (see :mod:`potion.ptn_sweep` for the roles), and the warm-up of a joblib worker.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from potion.config import model_kwargs, to_dict
from potion.errors import ConfigError
from potion.ptn_sweep import INPUT_KEYS, check_ptn_config
from potion.unlearning.ptn import PTNSchedule, default_s_start
from potion.unlearning.ptn_candidates import Candidate

log = logging.getLogger("potion.ptn_sweep")


@dataclass
class Loaded:
    """A PTN method's inputs, built the way run_unlearning builds them."""

    task: Any  # UnlearnTask
    method_fn: Any
    method_args: dict[str, Any]
    run: Any  # TrainedRun


# One entry per process: a sweep's jobs share the trained run, the poisoned data and the discovery, so a
# worker (or the basic launcher's single process) loads them once instead of once per candidate.
_INPUTS: dict[str, tuple[Any, Any, Any]] = {}


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


def warm_up(cfg: dict[str, Any]) -> int:
    """Run in a launcher's worker before its first job: import torch and the methods, load the job inputs.

    The ptn sweeper calls it through a joblib launcher while it opens the MLflow store and parent run, so
    the worker start-up (interpreter, imports, data) overlaps that instead of delaying the prepare job.
    """
    from potion.unlearning.registry import load_builtin_methods

    load_builtin_methods()
    _inputs(OmegaConf.create(cfg))
    return os.getpid()


def _load(cfg: DictConfig, step: int | list[int]) -> Loaded:
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
    args["ptn"] = {**args.get("ptn", {}), "fixed_step": step}
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
    """The sweep's first job: importances into the cache (once), a0, the schedule, n_f.

    Runs the configured method at step 0 (its own importance code, so the cache key is the one every
    job computes), which also yields a0 and the step-0 candidate (a cross-check for the jobs).
    """
    check_ptn_config(cfg)
    torch.set_num_threads(_threads())
    t0 = time.perf_counter()
    job = _load(cfg, 0)
    out = job.method_fn(job.task, **job.method_args)
    d, importance_seconds = out.diagnostics, float(out.timings.get("importance_seconds", 0.0))
    schedule = schedule_of(cfg, job.task.discovery.n_f, job.task.num_train)
    n_f, n_p, num_train = job.task.discovery.n_f, job.run.plan.count, job.task.num_train
    del job, out
    if torch.cuda.is_available():  # later jobs in this process (the basic launcher) need the memory
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


def run_candidates(cfg: DictConfig, steps: Sequence[int] | None) -> list[dict[str, Any]]:
    """PTN candidates: the cached importances read once, then for each step k a dampening from the
    undampened model and its forget accuracy; one dict per step, in the order given.

    Writes nothing and evaluates nothing on the test set; the sweeper records each step's values as a
    child MLflow run (``potion.ptn_sweep.log_candidate``), so jobs never open the tracking store (no
    MLflow import in workers, one writer to a sqlite store).
    """
    if not steps:
        raise ConfigError("a ptn candidate job needs ptn_job.steps (set by the ptn sweeper)")
    check_ptn_config(cfg)
    steps = [int(k) for k in steps]
    torch.set_num_threads(_threads())
    t0 = time.perf_counter()
    job = _load(cfg, steps)
    out = job.method_fn(job.task, **job.method_args)
    d = out.diagnostics
    if not d["importance_cache_hit"]:
        log.warning("PTN candidates k=%s computed their importances: the prepare job's cache entry was not found "
                    "(same POTION_CACHE_DIR on a shared filesystem and the same device type for all jobs?)", steps)
    a0, threshold = float(d["ptn_a0"]), float(d["ptn_threshold"])
    seconds = (time.perf_counter() - t0) / len(steps)
    shared = {"a0": a0, "threshold": threshold, "importance_cache_hit": float(d["importance_cache_hit"]),
              "importance_seconds": float(out.timings.get("importance_seconds", 0.0)), "candidate_seconds": seconds}
    rows = [Candidate(**{k: row[k] for k in Candidate.__dataclass_fields__}) for row in out.trajectory]
    if [c.step for c in rows] != steps:
        raise RuntimeError(f"PTN candidates: asked for steps {steps}, the method evaluated {[c.step for c in rows]}")
    return [{**{k: float(v) for k, v in asdict(c).items()}, "step": c.step, "qualifies": c.qualifies(threshold),
             **shared} for c in rows]
