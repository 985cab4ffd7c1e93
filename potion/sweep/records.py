"""A PTN sweep's MLflow runs, all written by the sweeper's process (one writer for a sqlite store): the parent run,
a child run per candidate, the final run replayed from the calls its job recorded, and the search for an earlier
finished sweep of the same config. Names, params and tags come from :mod:`potion.tracking.naming`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from potion.config.compose import identity_hash, to_dict
from potion.core.io import read_json
from potion.sweep.protocol import TRACKING_KEY, TRAIN_INFO
from potion.tracking import naming
from potion.tracking.client import open_client, usable_uri
from potion.tracking.runs import MISSING, PENDING, SUMMARY, logged_state, record_run_id, trajectory_rows, write_pending
from potion.tracking.tracker import RecordingTracker, Tracker, start_tracker
from potion.tracking.uris import logger_settings
from potion.unlearning.ptn_candidates import Candidate

log = logging.getLogger(__name__)

SWEEP_KEY = "potion.sweep_key"  # tag: the identity of a sweep (config, training run, out_dir), to find a rerun's
RECORD = "ptn_sweep.json"
# Metrics of the final (healed) run repeated on the parent, so a sweep reads as one row in the MLflow UI.
FINAL_METRICS = ("clean_acc", "asr", "poison_acc", "healed", "healed_attainable", "acc_drop", "forget_acc",
                 "clean_acc_before", "asr_before", "poison_acc_before")


@dataclass(frozen=True)
class SweepRuns:
    """The names, params and tags of a sweep's runs, known once the prepare job has read the training run, and
    the key that finds an earlier finished sweep of the same config."""

    study: str
    experiment: str
    logger: dict[str, Any] | None  # the logger config with the experiment filled in
    method: str
    unlearn_name: str  # the final run's name without its step k
    params: dict[str, Any]  # the unlearning params every run of the sweep shares
    link: dict[str, str]  # the training-run link tags
    key: str  # potion.sweep_key: the config (sweeper keys aside), the training run and the out_dir

    def tags(self, task: str, parent: Tracker | None = None) -> dict[str, Any]:
        """The tags of one of the sweep's runs: its task, study, method, training run and (a child) sweep id."""
        sweep_id = {naming.SWEEP_ID: str(parent.run_id)} if parent is not None and parent.run_id else {}
        return {**naming.study_tags(task, self.study), naming.METHOD: self.method, **self.link, **sweep_id}


def sweep_runs(cfg: DictConfig, arguments: Sequence[str], prep: dict[str, Any]) -> SweepRuns:
    """How this sweep's runs read in MLflow, from its config, its command line and the prepare job's values."""
    train = prep.get(TRAIN_INFO) or {}
    train_cfg = train.get("cfg") or {}
    plain = to_dict(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # Hydra's resolvers need a job
    study = naming.study_name(train_cfg)
    name = naming.unlearn_run_name(plain, train_cfg, prep.get("n_f"), prep.get("n_p"), naming.grid_extras(arguments))
    trained = train.get("config_hash") or train.get("run_dir") or plain.get("train_run")
    key = identity_hash({**plain, "train_run": trained, "final_out_dir": plain.get("out_dir")})
    return SweepRuns(study, naming.experiment_name(plain.get("logger"), study),
                     naming.logger_for(plain.get("logger"), study), str(cfg.method.name), name,
                     naming.unlearn_params(plain, train_cfg, prep.get("n_f"), prep.get("n_p")),
                     naming.train_link_tags(train), key)


def check_tracking(logger_cfg: Any) -> None:
    """Check the logger config and reach its store now, as starting the parent run later would."""
    settings = logger_settings(logger_cfg)
    if settings is not None:
        usable_uri(settings)


@contextmanager
def parent_run(names: SweepRuns, prep: dict[str, Any], sweeper: dict[str, Any], sweep_dir: Path) -> Iterator[Tracker]:
    """The sweep's parent run with its tags, params and the prepare job's measurements."""
    tags = {**names.tags(naming.SWEEP), "potion.launcher": sweeper["launcher"], "potion.sweep_dir": str(sweep_dir),
            SWEEP_KEY: names.key}
    with start_tracker(names.logger, experiment=names.experiment, run_name=naming.sweep_run_name(names.unlearn_name),
                       tags=tags, what="sweep parent run") as parent:
        if parent.run_id:
            parent.set_tags({naming.SWEEP_ID: parent.run_id})
        parent.log_params({**names.params, "method.ptn.threshold": prep["threshold"], "sweeper": sweeper})
        parent.log_metrics({"ptn_a0": prep["a0"], **{k: prep[k] for k in ("importance_seconds", "prepare_seconds")},
                            "prepare_importance_cache_hit": prep["importance_cache_hit"]})
        yield parent


def log_candidates(parent: Tracker, names: SweepRuns, values: list[dict[str, Any]], cands: list[Candidate]) -> None:
    """Each candidate a child run under the parent, from the values its job returned, and a step of the parent's
    ``ptn_traj_*`` series."""
    for result, cand in zip(values, cands, strict=True):
        child = parent.child(run_name=naming.candidate_run_name(cand.step, names.unlearn_name),
                             tags={**names.tags(naming.CANDIDATE, parent), "potion.ptn_step": cand.step})
        method = names.params["method"]
        ptn = {**method.get("ptn", {}), "fixed_step": cand.step}
        child.log_params({**names.params, "method": {**method, "ptn": ptn},
                          "method.ptn.threshold": result.get("threshold")})
        child.log_metrics(naming.candidate_measurements(result))
        child.finish("FINISHED")
        parent.log_metrics(naming.trajectory_metrics(asdict(cand)), step=cand.step)


def log_outcome(parent: Tracker, result: dict[str, Any], summary: dict[str, Any], files: Sequence[Path]) -> None:
    """The answer on the parent: the search's values with the final run's metrics, its address, the files."""
    parent.log_metrics(naming.measurements({**result, **{k: summary.get(k) for k in FINAL_METRICS}}))
    parent.set_tags({"potion.final_run_id": summary.get("mlflow_run_id"),
                     "potion.final_run_dir": summary.get("run_dir"),
                     "potion.final_reused": bool(summary.get("reused", False))})
    for path in files:
        parent.log_artifact(path)


def final_run(parent: Any, names: SweepRuns, step: int, launch: Callable[[str | None], dict[str, Any]],
              trajectory: tuple[Path, Path]) -> tuple[dict[str, Any], Path | None]:
    """The final job at ``step`` (``launch(its run id)``), its recorded tracking calls replayed into a child run
    created for it here; (its summary, its run folder when those calls wait there for ``potion.relog``).

    The child also gets the whole search's trajectory (the job evaluated one step). A reused final run that the
    store holds gets no new child run (the placeholder is deleted and the summary names the earlier run); one
    the store lacks is logged into it.
    """
    run_name = f"{names.unlearn_name} k={int(step)}"
    with parent.child(run_name, tags=names.tags(naming.UNLEARN, parent)) as child:
        summary = launch(child.run_id)
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


def _trajectory_calls(trajectory: tuple[Path, Path]) -> list[tuple[str, Any]]:
    """The whole search's trajectory as recorded tracking calls: its ``ptn_traj_*`` series and plot."""
    csv_path, png = trajectory
    calls: list[tuple[str, Any]] = [("metrics", (values, step)) for step, values in trajectory_rows(csv_path)]
    return [*calls, ("artifact", (str(png), None))]


def _already_logged(parent: Any, summary: dict[str, Any]) -> bool:
    """Whether the store holds a reused final run (or cannot be asked: then nothing is logged again)."""
    if getattr(parent, "client", None) is None or getattr(parent, "offline", False):
        return True
    return logged_state(parent.client, str(parent.experiment_id), Path(str(summary["run_dir"])), summary,
                        "unlearn") != MISSING


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
        return next((r for r in (_reusable(client, run) for run in runs) if r is not None), None)
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
