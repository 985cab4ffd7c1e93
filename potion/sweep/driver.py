"""PTN as a Hydra multirun, the sweeper's side: the search the ``ptn`` sweeper (``hydra_plugins/potion_ptn``) runs
through whatever launcher Hydra is configured with, and the MLflow runs it writes. Never imports torch, so the
sweeper can sit where no tensor work happens (a cluster login node); the jobs' work is :mod:`potion.sweep.jobs`.

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

import io
import logging
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import redirect_stderr
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from potion.config.compose import check_node, identity_hash, to_dict
from potion.config.schema import SweeperConfig
from potion.core.errors import ConfigError
from potion.core.io import atomic_write_json, read_json
from potion.pipelines.lifecycle import complete_sweep_parent, write_rows_csv
from potion.tracking import naming
from potion.tracking.client import open_client, usable_uri
from potion.tracking.runs import (
    MISSING,
    PENDING,
    SUMMARY,
    TRAJECTORY,
    logged_state,
    record_run_id,
    replay_command,
    trajectory_rows,
    write_pending,
)
from potion.tracking.tracker import RecordingTracker, Tracker, start_tracker
from potion.tracking.uris import logger_settings
from potion.unlearning.ptn_candidates import Candidate, first_qualifying
from potion.unlearning.registry import declared_names

log = logging.getLogger(__name__)

JOB_KEY = "ptn_job"  # config node the sweeper adds to its jobs: {role, steps, parent_run_id, run_id}
PREPARE, CANDIDATE, FINAL = "prepare", "candidate", "final"
ROLES = (PREPARE, CANDIDATE, FINAL)
SWEEPER_KEYS = ("method.ptn.fixed_step", JOB_KEY)  # set by the sweeper per job, never by the user
TRACKING_KEY = "ptn_tracking"  # in a final job's return value: its recorded tracking calls and final status
TRAIN_INFO = "train_run"  # in the prepare job's return value: the training run's config, MLflow id, hash, folder
SWEEP_KEY = "potion.sweep_key"  # tag: the identity of a sweep (config, training run, out_dir), to find a rerun's
RECORD = "ptn_sweep.json"
# Metrics of the final (healed) run repeated on the parent, so a sweep reads as one row in the MLflow UI.
FINAL_METRICS = ("clean_acc", "asr", "poison_acc", "healed", "healed_attainable", "acc_drop", "forget_acc",
                 "clean_acc_before", "asr_before", "poison_acc_before")

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
    """``hydra.sweeper.batch_size`` / ``steps_per_job`` checked by the schema; the steps per job (null: a round)."""
    check_node(SweeperConfig, {"batch_size": batch_size, "steps_per_job": steps_per_job}, "hydra.sweeper")
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


def candidate_of(ret: dict[str, Any]) -> Candidate:
    """A candidate job's return value as the search's Candidate."""
    return Candidate(int(ret["step"]), float(ret["s"]), float(ret["percentile"]), float(ret["alpha"]),
                     float(ret["dampened_share"]), float(ret["forget_acc"]))


# --------------------------------------------------------------------------- how the sweep's runs read in MLflow


@dataclass(frozen=True)
class SweepRuns:
    """The names, params and tags of a sweep's runs (:mod:`potion.tracking.naming`), known once the prepare job has
    read the training run, and the key that finds an earlier finished sweep of the same config."""

    study: str
    experiment: str
    logger: dict[str, Any] | None  # the logger config with the experiment filled in
    unlearn_name: str  # the final run's name without its step k
    params: dict[str, Any]  # the unlearning params every run of the sweep shares
    link: dict[str, str]  # the training-run link tags
    key: str  # potion.sweep_key: the config (sweeper keys aside), the training run and the out_dir


def sweep_runs(cfg: DictConfig, arguments: Sequence[str], prep: dict[str, Any]) -> SweepRuns:
    """How this sweep's runs read in MLflow, from its config, its command line and the prepare job's values."""
    train = prep.get(TRAIN_INFO) or {}
    train_cfg = train.get("cfg") or {}
    plain = _without_hydra(cfg)
    study = naming.study_name(train_cfg)
    logger = naming.logger_for(plain.get("logger"), study)
    name = naming.unlearn_run_name(plain, train_cfg, prep.get("n_f"), prep.get("n_p"), naming.grid_extras(arguments))
    trained = train.get("config_hash") or train.get("run_dir") or plain.get("train_run")
    key = identity_hash({**plain, "train_run": trained, "final_out_dir": plain.get("out_dir")})
    return SweepRuns(study, naming.experiment_name(plain.get("logger"), study), logger, name,
                     naming.unlearn_params(plain, train_cfg, prep.get("n_f"), prep.get("n_p")),
                     naming.train_link_tags(train), key)


def _without_hydra(cfg: DictConfig) -> dict[str, Any]:
    """The sweep's config as a plain dict, without Hydra's own node (its resolvers need a running job)."""
    return to_dict(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))


# --------------------------------------------------------------------------- the search


def run_sweep(cfg: DictConfig, arguments: list[str], launch: Launch, settings: SweepSettings, sweep_dir: Path
              ) -> list[Sequence[Any]]:
    """The PTN search as launches of jobs; every launch's JobReturns, the final job's last.

    A finished sweep of the same config that the store holds (its record and final run folder still on disk)
    is not run again: after the prepare job, nothing is launched or logged, and the sweep folder's
    ``ptn_sweep.json`` points at the earlier parent run (``force=true`` runs it again).
    """
    started = time.perf_counter()
    method = str(cfg.method.name)
    returns: list[Sequence[Any]] = []

    def run(jobs: list[list[str]]) -> list[Any]:
        returns.append(launch([[*arguments, *job] for job in jobs]))
        return [job_value(r) for r in returns[-1]]  # re-raises a failed job's error

    _check_tracking(cfg.get("logger"))  # a bad logger config or a dead server: one line before any job
    prep = run([job_overrides(None, PREPARE, None)])[0]
    names = sweep_runs(cfg, arguments, prep)
    earlier = None if cfg.get("force") else finished_sweep(names)
    if earlier is not None:
        _point_to(earlier, sweep_dir, names)
        return returns
    with start_tracker(names.logger, experiment=names.experiment, run_name=naming.sweep_run_name(names.unlearn_name),
                       tags={**naming.study_tags(naming.SWEEP, names.study), naming.METHOD: method, **names.link,
                             "potion.launcher": settings.launcher, "potion.sweep_dir": str(sweep_dir),
                             SWEEP_KEY: names.key}, what="sweep parent run") as parent:
        if parent.run_id:
            parent.set_tags({naming.SWEEP_ID: parent.run_id})
        parent.log_params({**names.params, "method.ptn.threshold": prep["threshold"], "sweeper": {
            "batch_size": settings.batch_size, "launcher": settings.launcher, "steps_per_job": settings.steps_per_job}})
        _log_prepare(cfg, parent, prep)
        evaluated, chosen = _rounds(cfg, run, parent, settings, prep, names)
        reached = chosen is not None
        if chosen is None:  # as the in-process search: keep the last step
            chosen = max(evaluated, key=lambda c: c.step)
            log.warning("PTN sweep: rho=%s never met in %d steps; the final run uses the last step k=%d",
                        cfg.method.ptn.rho, len(evaluated), chosen.step)
        trajectory = _write_trajectory(sweep_dir, evaluated, prep["threshold"], f"PTN sweep: {names.unlearn_name}")
        summary, pending = _final(cfg, run, parent, chosen.step, names, trajectory)
        complete_sweep_parent(parent, cfg, sweep_dir, summary)  # config.yaml, the final run's inputs and address
        result = {
            "ptn_chosen_step": chosen.step, "ptn_steps": chosen.step + 1, "ptn_s": chosen.s, "ptn_alpha": chosen.alpha,
            "ptn_percentile": chosen.percentile, "ptn_dampened_share": chosen.dampened_share,
            "ptn_forget_acc": chosen.forget_acc, "ptn_reached": reached, "ptn_steps_evaluated": len(evaluated),
            "ptn_rounds": len(returns) - 2, "ptn_wall_seconds": time.perf_counter() - started,
            "ptn_jobs_recomputed_importance": sum(not c["importance_cache_hit"] for c in _values(returns[1:-1])),
            "ptn_a0": prep["a0"], "ptn_threshold": prep["threshold"],
        }
        parent.log_metrics(naming.measurements({**result, **{k: summary.get(k) for k in FINAL_METRICS}}))
        parent.set_tags({"potion.final_run_id": summary.get("mlflow_run_id"),
                         "potion.final_run_dir": summary.get("run_dir"),
                         "potion.final_reused": bool(summary.get("reused", False))})
        record = _write_record(cfg, sweep_dir, {**result, "parent_run_id": parent.run_id, SWEEP_KEY: names.key},
                               evaluated, summary, prep)
        for path in (*trajectory, record):
            parent.log_artifact(path)
        _warn_tracking_lost(parent, sweep_dir, pending)
    print(f"PTN sweep ({settings.launcher}, rounds of {settings.batch_size}): k={chosen.step} s={chosen.s:.4g} "
          f"alpha={chosen.alpha:.4g} forget_acc {prep['a0']:.4f} -> {chosen.forget_acc:.4f} (threshold "
          f"{prep['threshold']:.4f}, reached={reached}); {len(evaluated)} candidates in {result['ptn_rounds']} "
          f"rounds, {result['ptn_wall_seconds']:.1f} s; sweep folder {sweep_dir}", flush=True)
    return returns


def _check_tracking(logger_cfg: Any) -> None:
    """Check the logger config and reach its store now, as starting the parent run later would."""
    settings = logger_settings(logger_cfg)
    if settings is not None:
        usable_uri(settings)


def job_value(job: Any) -> Any:
    """A job's return value; a failed job's error is raised without Hydra's line naming the job's overrides
    (the sweeper's internal ``++ptn_job.*`` keys): the sweeper prints the error in one line."""
    with redirect_stderr(io.StringIO()):
        return job.return_value


def _values(launches: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """Every candidate value the candidate jobs of these launches returned."""
    return [v for results in launches for r in results for v in r.return_value]


def _log_prepare(cfg: DictConfig, parent: Tracker, prep: dict[str, Any]) -> None:
    parent.log_metrics({"ptn_a0": prep["a0"], "importance_seconds": prep["importance_seconds"],
                        "prepare_seconds": prep["prepare_seconds"],
                        "prepare_importance_cache_hit": prep["importance_cache_hit"]})
    print(f"PTN sweep: importances {'from the cache' if prep['importance_cache_hit'] else 'computed'} in "
          f"{prep['importance_seconds']:.2f} s (n_f={prep['n_f']} of {prep['n_p']} poisoned); forget_acc "
          f"{prep['a0']:.4f} before, the search stops at <= {prep['threshold']:.4f} (up to "
          f"{int(cfg.method.ptn.max_steps)} steps)", flush=True)


def _schedule(cfg: DictConfig, prep: dict[str, Any]) -> dict[str, Any]:
    """The searched grid: the config's, with s_start as the method used it (s_0; a default depends on n_f)."""
    p = cfg.method.ptn
    return {"s_start": prep["s"], "s_step": float(p.s_step), "max_steps": int(p.max_steps), "rho": float(p.rho)}


def _rounds(cfg: DictConfig, run: Callable[[list[list[str]]], list[Any]], parent: Tracker, settings: SweepSettings,
            prep: dict[str, Any], names: SweepRuns) -> tuple[list[Candidate], Candidate | None]:
    """Launch rounds of candidate jobs until one holds a qualifying step; (evaluated, the chosen one or None).

    Every candidate becomes a child run, and its values a step of the parent's ``ptn_traj_*`` series."""
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
        for v, c in zip(values, cands, strict=True):
            log_candidate(parent, names, v)
            parent.log_metrics(naming.trajectory_metrics(asdict(c)), step=c.step)
        evaluated.extend(cands)
        chosen = first_qualifying(cands, prep["threshold"])
        print(_round_line(r + 1, rounds, cands, chosen, prep["threshold"], time.perf_counter() - t0), flush=True)
        if chosen is not None:
            return evaluated, chosen
    return evaluated, None


def _round_line(number: int, rounds: int, cands: list[Candidate], chosen: Candidate | None, threshold: float,
                seconds: float) -> str:
    """The sweep's console line for one round of candidate jobs (the launcher's own lines are silenced)."""
    by_step = sorted(cands, key=lambda c: c.step)
    if chosen is not None:
        found = f"k={chosen.step} qualifies (forget_acc {chosen.forget_acc:.4f} <= {threshold:.4f})"
    else:
        found = (f"forget_acc {by_step[0].forget_acc:.4f} .. {by_step[-1].forget_acc:.4f}, none at or below "
                 f"{threshold:.4f}")
    return (f"PTN round {number} of at most {rounds} (steps {by_step[0].step}..{by_step[-1].step}): {found}; "
            f"{seconds:.1f} s")


def _write_trajectory(sweep_dir: Path, evaluated: list[Candidate], threshold: float, title: str
                      ) -> tuple[Path, Path]:
    """The sweep folder's ptn_trajectory.csv and its plot (the whole search, as an in-process run draws it)."""
    from potion.reporting.plots import plot_ptn_trajectory  # matplotlib: loaded only when a sweep gets this far

    rows = [asdict(c) for c in sorted(evaluated, key=lambda c: c.step)]
    return (write_rows_csv(sweep_dir / TRAJECTORY, rows),
            plot_ptn_trajectory(rows, threshold, sweep_dir / "ptn_trajectory.png", title=title))


def _write_record(cfg: DictConfig, sweep_dir: Path, result: dict[str, Any], evaluated: list[Candidate],
                  summary: dict[str, Any], prep: dict[str, Any]) -> Path:
    """The sweep folder's ptn_sweep.json (the whole record)."""
    rows = [asdict(c) for c in sorted(evaluated, key=lambda c: c.step)]
    record = {**result, "schedule": _schedule(cfg, prep), "n_f": prep["n_f"], "n_p": prep["n_p"],
              "method": str(cfg.method.name), "final_run_dir": summary.get("run_dir"),
              "final_mlflow_run_id": summary.get("mlflow_run_id"),
              "final": {k: summary.get(k) for k in FINAL_METRICS}, "trajectory": rows}
    return atomic_write_json(sweep_dir / RECORD, record)


# --------------------------------------------------------------------------- a sweep run before


def finished_sweep(names: SweepRuns) -> dict[str, Any] | None:
    """The record of the newest finished sweep of the same config (``potion.sweep_key``) that the store holds,
    whose sweep record, final run folder and final run are all still there; None when there is none (or the
    store cannot say: then the sweep runs again, a duplicate, never a loss)."""
    settings = logger_settings(names.logger)
    if settings is None:
        return None
    query = (f"tags.`{naming.TASK}` = '{naming.SWEEP}' and tags.`{SWEEP_KEY}` = '{names.key}' "
             "and attributes.status = 'FINISHED'")
    try:
        client, _ = open_client(usable_uri(settings))
        experiment = client.get_experiment_by_name(names.experiment)
        if experiment is None:
            return None
        runs = client.search_runs([experiment.experiment_id], filter_string=query, max_results=10,
                                  order_by=["attributes.start_time DESC"])
        return next((r for r in map(lambda run: _reusable(client, run), runs) if r is not None), None)
    except Exception as exc:  # noqa: BLE001 - the store could not be asked: run the sweep
        log.debug("looking for an earlier sweep failed: %s", exc)
        return None


def _reusable(client: Any, run: Any) -> dict[str, Any] | None:
    """An earlier sweep's record (with its parent run id), when its files and final run are all still there."""
    tags = run.data.tags
    try:
        record = read_json(Path(tags.get("potion.sweep_dir", "")) / RECORD)
        final = read_json(Path(tags.get("potion.final_run_dir", "")) / SUMMARY)
    except Exception:  # noqa: BLE001 - missing or unreadable files: not reusable
        return None
    final_id = tags.get("potion.final_run_id")
    if not isinstance(record, dict) or not isinstance(final, dict) or final.get("mlflow_run_id") != final_id:
        return None
    if client.get_run(final_id).info.status != "FINISHED":
        return None
    return {**record, "reused_parent_run_id": run.info.run_id, "reused_sweep_dir": tags.get("potion.sweep_dir")}


def _point_to(earlier: dict[str, Any], sweep_dir: Path, names: SweepRuns) -> Path:
    """A rerun of a finished sweep: its record in this sweep folder names the earlier parent run; nothing logged."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write_json(sweep_dir / RECORD, earlier)
    print(f"PTN sweep already finished: k={earlier.get('ptn_chosen_step')} (MLflow run "
          f"{earlier['reused_parent_run_id']} in experiment {names.experiment}, sweep folder "
          f"{earlier.get('reused_sweep_dir')}); nothing logged again (force=true runs it again)", flush=True)
    return path


# --------------------------------------------------------------------------- the jobs' runs, written here


def log_candidate(parent: Tracker, names: SweepRuns, result: dict[str, Any]) -> str | None:
    """A candidate's child run under the sweep's parent run, from the values its job returned; its run id."""
    step = int(result["step"])
    method = str(names.params["method"].get("name"))
    child = parent.child(run_name=naming.candidate_run_name(step, names.unlearn_name),
                         tags={**naming.study_tags(naming.CANDIDATE, names.study), naming.METHOD: method,
                               "potion.ptn_step": step, **names.link, **_sweep_id(parent)})
    params = dict(names.params)
    params["method"] = {**params["method"], "ptn": {**params["method"].get("ptn", {}), "fixed_step": step}}
    child.log_params({**params, "method.ptn.threshold": result.get("threshold")})
    child.log_metrics(naming.candidate_measurements(result))
    child.finish("FINISHED")
    return child.run_id


def _sweep_id(parent: Any) -> dict[str, str]:
    return {naming.SWEEP_ID: str(parent.run_id)} if parent.run_id else {}


def _trajectory_calls(trajectory: tuple[Path, Path] | None) -> list[tuple[str, Any]]:
    """The whole search's trajectory as recorded tracking calls: its ``ptn_traj_*`` series and plot."""
    if trajectory is None:
        return []
    csv_path, png = trajectory
    calls: list[tuple[str, Any]] = [("metrics", (values, step)) for step, values in trajectory_rows(csv_path)]
    return [*calls, ("artifact", (str(png), None))]


def _final(cfg: DictConfig, run: Callable[[list[list[str]]], list[Any]], parent: Any, step: int, names: SweepRuns,
           trajectory: tuple[Path, Path] | None = None) -> tuple[dict[str, Any], Path | None]:
    """The final job at ``step``, its recorded tracking calls replayed into a child run created for it here;
    (its summary, its run folder when those calls wait there for ``potion.relog``).

    The child also gets the whole search's trajectory (the job evaluated one step). A reused final run that the
    store holds gets no new child run (the placeholder is deleted and the summary names the earlier run); one
    the store lacks is logged into it.
    """
    method = str(cfg.method.name)
    run_name = f"{names.unlearn_name} k={int(step)}"
    with parent.child(run_name, tags={**naming.study_tags(naming.UNLEARN, names.study), naming.METHOD: method,
                                      **names.link, **_sweep_id(parent)}) as child:
        summary = run([job_overrides(step, FINAL, parent.run_id, run_id=child.run_id)])[0]
        record = summary.pop(TRACKING_KEY, None)
        if record is None or (summary.get("reused") and _already_logged(parent, summary)):
            child.discard()
            return summary, None
        calls = [*record["calls"], *_trajectory_calls(trajectory)]
        run_dir = Path(str(summary["run_dir"]))
        if child.run_id is not None:
            RecordingTracker.replay(calls, child)
            child.finish(record["status"] or "FINISHED")
        if child.run_id is not None and not getattr(child, "failed", False):
            (run_dir / PENDING).unlink(missing_ok=True)
            if summary.get("mlflow_run_id") != child.run_id:
                summary = {**record_run_id(run_dir, summary, child.run_id), "reused": summary.get("reused", False)}
            return summary, None
    write_pending(run_dir, tracking_uri=str(parent.tracking_uri), experiment=names.experiment, run_name=run_name,
                  parent_run_id=parent.run_id, calls=calls, status=record["status"])
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
