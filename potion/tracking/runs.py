"""Finished run folders that their MLflow store lacks, logged from the folder.

A run is written to disk first and tracked second, so a killed process, a dead server or ``logger=none`` leaves a
finished folder whose MLflow run is missing or left RUNNING: :func:`ensure_logged` logs it when the folder is
reused. A sweep's final run whose calls could not be replayed waits in ``mlflow_pending.json`` for
``python -m potion.relog`` (:func:`replay_pending`): into the store the user names, with the folder's own files
only, so a folder someone else handed over cannot send the user's files anywhere.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from potion.core.errors import TrackingError
from potion.core.io import atomic_write_json, read_json
from potion.tracking import naming
from potion.tracking.client import open_client, usable_uri
from potion.tracking.extras import find_run
from potion.tracking.liveness import close_dead_runs, close_killed, process_alive
from potion.tracking.tracker import MlflowTracker, RecordingTracker, Tracker
from potion.tracking.uris import logger_settings, resolve_tracking_uri

log = logging.getLogger(__name__)

SUMMARY = "summary.json"
PENDING = "mlflow_pending.json"  # a sweep's final run: the tracking calls the sweeper could not replay
PENDING_FILES = "mlflow_pending"  # the files those calls upload that live outside the run folder, copied in
TRAIN_ARTIFACTS = ("model.safetensors", "poison_plan.json", "config.yaml", SUMMARY)
UNLEARN_ARTIFACTS = ("model.safetensors", "suspects.csv", "ptn_trajectory.csv", "ptn_trajectory.png", SUMMARY)
TRAJECTORY = "ptn_trajectory.csv"
STILL_LOGGING_S = 600.0  # a run RUNNING this long after its summary was written is not being logged any more
LOGGED, BUSY, MISSING = "logged", "busy", "missing"


@dataclass
class FolderRun:
    """How a finished run folder reads as an MLflow run: what its pipeline logs when it runs."""

    task: str  # potion.task: train or unlearn
    experiment: str
    run_name: str
    tags: dict[str, Any]
    params: dict[str, Any]
    artifacts: tuple[str, ...] = field(default=())


def train_folder_run(cfg: Any, config_hash: str, n_p: int | None) -> FolderRun:
    """How a training run reads in MLflow, live or logged from its folder (params: the config; tags: task, study,
    hash, grid)."""
    study = naming.study_name(cfg)
    grid, overrides = naming.hydra_job()
    tags = {**naming.study_tags(naming.TRAIN, study), naming.CONFIG_HASH: config_hash, **naming.grid_tags(grid)}
    return FolderRun("train", naming.experiment_name(cfg.get("logger"), study),
                     naming.train_run_name(cfg, naming.train_extras(cfg, overrides)), tags,
                     naming.train_params(cfg, n_p), TRAIN_ARTIFACTS)


def unlearn_folder_run(experiment: str, run_name: str, tags: Mapping[str, Any], params: Mapping[str, Any]
                       ) -> FolderRun:
    """A finished unlearning folder as unlearn.py logs it (its experiment, name, tags and params)."""
    return FolderRun("unlearn", experiment, run_name, dict(tags), dict(params), UNLEARN_ARTIFACTS)


# --------------------------------------------------------------------------- logging a folder


def log_folder(tracker: Tracker, run_dir: Path, summary: Mapping[str, Any], spec: FolderRun) -> None:
    """Log a finished folder into ``tracker``: tags, params, the summary's numbers, the PTN trajectory, files."""
    run_dir = Path(run_dir)
    tracker.set_tags({**spec.tags, "potion.logged_from_folder": "true"})
    tracker.log_params(spec.params)
    method = spec.params.get("method")
    tracker.log_metrics(summary_metrics(summary, method if isinstance(method, Mapping) else None))
    for step, row in trajectory_rows(run_dir / TRAJECTORY):
        tracker.log_metrics(row, step=step)
    for name in spec.artifacts:
        if (run_dir / name).is_file():
            tracker.log_artifact(run_dir / name)


def summary_metrics(summary: Mapping[str, Any], method_cfg: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The measurements of a summary, as the pipeline logged them (counts and resolved settings are params)."""
    return naming.measurements({k: v for k, v in summary.items() if k not in naming.SUMMARY_ONLY}, method_cfg)


def trajectory_rows(path: Path) -> Iterator[tuple[int, dict[str, float]]]:
    """The PTN trajectory CSV as (step, {ptn_traj_<column>: value}), as unlearn.py logs it; nothing if absent."""
    if not path.is_file():
        return
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                step = int(float(row["step"]))
                values = naming.trajectory_metrics({k: float(v) for k, v in row.items() if v not in (None, "")})
            except (KeyError, TypeError, ValueError):
                continue  # a row that is not numbers is left out, as a malformed metric would be
            yield step, values


def record_run_id(run_dir: Path, summary: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """Name ``run_id`` as the folder's MLflow run in its summary.json (rewritten atomically); the new summary."""
    updated = {k: v for k, v in summary.items() if k != "reused"} | {"mlflow_run_id": run_id}
    atomic_write_json(Path(run_dir) / SUMMARY, updated)
    return updated


# --------------------------------------------------------------------------- is it in the store?


def logged_state(client: Any, experiment_id: str, run_dir: Path, summary: Mapping[str, Any], task: str) -> str:
    """LOGGED (a FINISHED run of this work is in the store), BUSY (its process is logging it right now)
    or MISSING. A run of the summary left RUNNING by a process that stopped is closed as KILLED here."""
    run = find_run(client, summary.get("mlflow_run_id"))
    if run is not None and run.info.lifecycle_stage != "deleted":
        if run.info.status == "FINISHED":
            return LOGGED
        if run.info.status in ("RUNNING", "SCHEDULED"):
            if _still_logging(run, Path(run_dir) / SUMMARY):
                return BUSY
            if close_killed(client, run.info.run_id):
                log.warning("closed MLflow run %s as KILLED: its process stopped after the results were written",
                            run.info.run_id)
    return LOGGED if _finished_twin(client, experiment_id, summary, task) else MISSING


def _still_logging(run: Any, summary_path: Path) -> bool:
    """Whether the run's process may still be writing it: alive, or unknown (another host) with a fresh summary."""
    alive = process_alive(run.data.tags)
    if alive is not None:
        return alive
    try:
        age = time.time() - summary_path.stat().st_mtime
    except OSError:
        return False
    return age < STILL_LOGGING_S


def _finished_twin(client: Any, experiment_id: str, summary: Mapping[str, Any], task: str) -> bool:
    """Whether the experiment holds a FINISHED run of the same work (same task and config hash)."""
    config_hash = str(summary.get("config_hash") or "").replace("'", "")
    if not config_hash:
        return False
    query = (f"tags.`potion.config_hash` = '{config_hash}' and tags.`potion.task` = '{task}' "
             "and attributes.status = 'FINISHED'")
    try:
        return bool(client.search_runs([experiment_id], filter_string=query, max_results=1))
    except Exception:  # noqa: BLE001 - then it is logged again: a duplicate, never a loss
        return False


# --------------------------------------------------------------------------- reuse


def ensure_logged(logger_cfg: Mapping[str, Any] | None, run_dir: Path, summary: dict[str, Any], spec: FolderRun,
                  parent_run_id: str | None = None) -> dict[str, Any]:
    """Make sure a reused finished run is in the configured store; return its summary (naming the run).

    Checks the ``logger`` config as a new run would (a bad URI, fallback or timeout is one error line,
    an unreachable server too unless fallback=local), then logs the folder when the store has no FINISHED
    run of it. With ``logger=none`` nothing is checked or logged.
    """
    settings = logger_settings(logger_cfg)
    if settings is None:
        return summary
    uri = usable_uri(settings)
    experiment = settings.experiment or spec.experiment
    client, experiment_id = open_client(uri, experiment)
    close_dead_runs(client, str(experiment_id))
    state = logged_state(client, str(experiment_id), run_dir, summary, spec.task)
    if state == BUSY:
        log.info("MLflow run %s of %s is still being written by its process; not logged again",
                 summary.get("mlflow_run_id"), run_dir)
    if state != MISSING:
        return summary
    tracker = MlflowTracker.start(uri, experiment, run_name=spec.run_name, parent_run_id=parent_run_id)
    updated = record_run_id(run_dir, summary, str(tracker.run_id))
    log_folder(tracker, run_dir, updated, spec)
    tracker.finish("FINISHED")
    log.info("logged the finished run %s to MLflow as run %s (its tracking was missing or unfinished)", run_dir,
             tracker.run_id)
    return updated


# --------------------------------------------------------------------------- a sweep's final run, kept for later


def write_pending(run_dir: Path, *, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None,
                  calls: list[Any], status: str | None) -> Path:
    """Keep a run's recorded tracking calls in its folder (``mlflow_pending.json``) for :func:`replay_pending`.

    A file the calls upload from outside the folder (the sweep's trajectory plot) is copied into
    ``mlflow_pending/`` there first, since a replay uploads nothing from outside the run folder.
    """
    run_dir = Path(run_dir)
    kept = [_keep_inside(run_dir, kind, args) for kind, args in calls]
    return atomic_write_json(run_dir / PENDING, {
        "tracking_uri": tracking_uri, "experiment": experiment, "run_name": run_name,
        "parent_run_id": parent_run_id, "status": status or "FINISHED", "calls": [list(c) for c in kept]})


def _keep_inside(run_dir: Path, kind: str, args: Any) -> tuple[str, Any]:
    """A recorded call whose files lie in ``run_dir`` (those outside are copied into ``mlflow_pending/``)."""
    def inside(path: str) -> str:
        if _within(run_dir, Path(path)):
            return path
        dst = run_dir / PENDING_FILES / Path(path).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dst)
        return str(dst)

    if kind == "artifact":
        return kind, (inside(args[0]), args[1])
    if kind == "model":
        return kind, {**args, "files": {k: inside(v) for k, v in args["files"].items()}}
    return kind, args


def _within(folder: Path, path: Path) -> bool:
    """Whether the absolute ``path``, with every symlink followed, lies inside ``folder``."""
    return path.is_absolute() and path.resolve().is_relative_to(folder.resolve())


def replay_command(run_dir: Path, tracking_uri: str) -> str:
    """The command that logs a folder's pending run (for messages)."""
    return f"python -m potion.relog {run_dir} --tracking-uri {tracking_uri}"


def pending_uri(run_dir: Path) -> str | None:
    """The tracking URI a folder's pending record was meant for (None when it names none); only for messages."""
    uri = _read_pending(Path(run_dir)).get("tracking_uri")
    return str(uri) if uri else None


def replay_pending(run_dir: Path, tracking_uri: str | None = None, timeout_s: float | None = None) -> tuple[str, str]:
    """Log the pending run of a folder into the store ``tracking_uri`` (the user's: None is the default
    ``sqlite:///<cwd>/mlflow.db``, never the URI the record names); return (run id, store URI).

    A record uploading a file outside the run folder (symlinks followed) is refused before anything is logged.
    The new run keeps its parent link (the sweep's run), ``summary.json`` names it, and the record is removed.
    """
    run_dir = Path(run_dir)
    record = _read_pending(run_dir)
    _check_files(run_dir, record["calls"])
    settings = logger_settings({"name": "mlflow", "tracking_uri": resolve_tracking_uri(tracking_uri),
                                "timeout_s": timeout_s})
    assert settings is not None
    uri = usable_uri(settings)
    tracker = MlflowTracker.start(uri, str(record.get("experiment") or "potion"),
                                  run_name=str(record.get("run_name") or "unlearn"),
                                  parent_run_id=record.get("parent_run_id") or None)
    try:
        RecordingTracker.replay(record["calls"], tracker)
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        tracker.discard()
        raise TrackingError(f"{run_dir / PENDING} holds a malformed tracking call ({exc})") from exc
    tracker.finish(str(record.get("status") or "FINISHED"))
    if tracker.failed:
        raise TrackingError(f"logging {run_dir} to {uri} failed part-way (see the warnings above); its record "
                            f"{run_dir / PENDING} is kept: run the command again")
    summary = read_json(run_dir / SUMMARY) if (run_dir / SUMMARY).is_file() else None
    if isinstance(summary, dict):
        record_run_id(run_dir, summary, str(tracker.run_id))
    (run_dir / PENDING).unlink(missing_ok=True)
    shutil.rmtree(run_dir / PENDING_FILES, ignore_errors=True)
    return str(tracker.run_id), uri


def _check_files(run_dir: Path, calls: list[Any]) -> None:
    """Refuse a record that uploads any file from outside the run folder (one line naming it)."""
    for call in calls:
        kind, args = (call[0], call[1]) if isinstance(call, list | tuple) and len(call) == 2 else (None, None)
        paths = [args[0]] if kind == "artifact" and isinstance(args, list | tuple) and args else []
        if kind == "model" and isinstance(args, dict) and isinstance(args.get("files"), dict):
            paths = list(args["files"].values())
        for path in paths:
            if not isinstance(path, str) or not _within(run_dir, Path(path)):
                raise TrackingError(f"{run_dir / PENDING} names the file {path!r} outside the run folder {run_dir}; "
                                    "nothing was logged (a relog uploads only the run folder's own files)")


def _read_pending(run_dir: Path) -> dict[str, Any]:
    path = run_dir / PENDING
    if not path.is_file():
        raise TrackingError(f"{run_dir} has no {PENDING}: nothing there waits to be logged (a train.py or "
                            "unlearn.py run is logged by running its command again)")
    try:
        record = read_json(path)
    except Exception as exc:  # CheckpointError for truncated JSON; anything else reads the same
        raise TrackingError(f"cannot read {path} ({exc})") from exc
    if not isinstance(record, dict) or not isinstance(record.get("calls"), list):
        raise TrackingError(f"{path} is not a pending MLflow run record")
    return record
