"""One run's lifecycle, the same for train.py, unlearn.py, ``potion.heal`` and a PTN sweep's final job.

The outputs are written atomically into the run folder, ``summary.json`` last, and tracked second: from then on a
tracking failure is a warning, since the run is on disk. The MLflow run ends FINISHED, FAILED, or KILLED on SIGTERM
or Ctrl+C; a reused finished folder is logged from the folder when its store lacks it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from potion.core.io import atomic_write_json, atomic_write_text, load_tensors, plain, save_tensors
from potion.core.run_log import LOG_FILE, RunLog, captured_log
from potion.reporting.plots import plot_ptn_trajectory
from potion.tracking.client import open_client, usable_uri
from potion.tracking.extras import MODEL_CONFIG, MODEL_WEIGHTS, DatasetRef, dataset_ref, model_name, model_spec
from potion.tracking.runs import SUMMARY, TRAJECTORY, FolderRun, ensure_logged, log_folder, trajectory_rows
from potion.tracking.tracker import MlflowTracker, Tracker, print_run_links, start_tracker
from potion.tracking.uris import logger_settings

log = logging.getLogger(__name__)


def write_rows_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows of one shape as a CSV file (written atomically); the columns are the first row's keys."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())


def config_text(config: Any) -> str:
    """A run's config as YAML: resolved where its interpolations resolve, as written otherwise."""
    if isinstance(config, DictConfig):
        try:
            return OmegaConf.to_yaml(config, resolve=True)
        except Exception:  # noqa: BLE001 - e.g. ${hydra:...} outside a Hydra job: keep the interpolation text
            return OmegaConf.to_yaml(config)
    return yaml.safe_dump(json.loads(json.dumps(plain(config), default=str)), sort_keys=False)


@dataclass(frozen=True)
class ModelWeights:
    """Weights a run wrote, and what rebuilds their network (for the logged model's ``model.json``)."""

    path: Path
    model_cfg: dict[str, Any]
    num_classes: int
    channels: int
    key_prefix: str = ""


@dataclass
class RunOutputs:
    """A started run: its folder, its tracker, and the files written so far (tracked as artifacts at the end)."""

    folder: Path
    tracker: Tracker
    artifacts: list[Path] = field(default_factory=list)
    run_name: str = "model"
    config: Any = None  # written as config.yaml at the end unless the pipeline wrote one
    log: RunLog | None = None  # the console while the run lasts: written as run.log at the end
    data: DatasetRef | None = None
    models: list[ModelWeights] = field(default_factory=list)

    def add(self, path: Path) -> Path:
        """Remember a file written into the folder (atomically, by the caller) as an artifact of the run."""
        self.artifacts.append(Path(path))
        return path

    def uses_data(self, bundle: Any, dataset_cfg: Mapping[str, Any], *, context: str = "training",
                  train_run_id: str | None = None) -> None:
        """Log the data set the run read (a decoded bundle, as ``dataset_cfg`` names it) as its dataset input, and
        the logged model of the training run ``train_run_id`` (an unlearning run's starting point) as its model
        input. ``context``: what the run used the data for (``training``, ``unlearning``)."""
        try:
            self.data = dataset_ref(bundle, dataset_cfg)
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            log.warning("the data set cannot be described as an MLflow input (%s: %s)", type(exc).__name__, exc)
            return
        self.tracker.log_inputs(self.data.to_dict(), context, train_run_id)

    def add_model(self, path: Path, model_cfg: Mapping[str, Any], num_classes: int, channels: int, *,
                  key_prefix: str = "") -> Path:
        """Remember written weights as an artifact and as the run's logged model (registered at the end, with
        ``config.yaml`` and a ``model.json`` that rebuilds the network: ``model_cfg`` is the ``model`` config)."""
        self.add(path)
        self.models.append(ModelWeights(Path(path), {str(k): v for k, v in dict(model_cfg).items()},
                                        int(num_classes), int(channels), key_prefix))
        return path

    def trajectory(self, rows: Sequence[Mapping[str, Any]], threshold: float, title: str) -> Path | None:
        """A PTN search's trajectory as ``ptn_trajectory.csv`` and its plot; the plot's path (None: no search)."""
        if not rows:
            return None
        self.add(write_rows_csv(self.folder / TRAJECTORY, rows))
        return self.add(plot_ptn_trajectory(list(rows), threshold, self.folder / "ptn_trajectory.png", title=title))

    def complete(self, summary: dict[str, Any], metrics: Mapping[str, Any],
                 tags: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write ``summary.json`` (last of the outputs), then track the metrics, the trajectory, tags and files.

        The run is complete once the summary is on disk, so a tracking failure after it is one warning.
        ``config.yaml`` (unless the pipeline wrote it) and ``run.log`` are written just before the summary.
        """
        config = self._write_config()
        if self.log is not None:
            self.add(atomic_write_text(self.folder / LOG_FILE, self.log.text()))
        atomic_write_json(self.folder / SUMMARY, summary)
        self.add(self.folder / SUMMARY)
        try:
            self.tracker.log_metrics(metrics)
            for step, row in trajectory_rows(self.folder / TRAJECTORY):
                self.tracker.log_metrics(row, step=step)
            if tags:
                self.tracker.set_tags(tags)
            for path in dict.fromkeys(self.artifacts):
                self.tracker.log_artifact(path)
            for weights in self.models:
                self._log_model(weights, config)
        except Exception as exc:  # noqa: BLE001 - any tracker failure means the same: results are on disk only
            log.warning("tracking the finished run failed (%s: %s); its results are in %s", type(exc).__name__, exc,
                        self.folder)
        return summary

    def _write_config(self) -> Path | None:
        """The run's config.yaml: the one the pipeline wrote, else the given config written now (None: neither)."""
        for path in self.artifacts:
            if path.name == MODEL_CONFIG:
                return path
        if self.config is None:
            return None
        return self.add(atomic_write_text(self.folder / MODEL_CONFIG, config_text(self.config)))

    def _log_model(self, weights: ModelWeights, config: Path | None) -> None:
        """Register the weights as the run's logged model: safetensors only (other weights are converted in a
        temporary folder, which a recording tracker cannot replay later, so theirs is left out)."""
        spec = model_spec(weights.model_cfg, weights.num_classes, weights.channels, key_prefix=weights.key_prefix,
                          data=self.data)
        files = {MODEL_CONFIG: str(config)} if config is not None else {}
        name = model_name(self.run_name)
        if weights.path.suffix == ".safetensors":
            self.tracker.log_model(name, {MODEL_WEIGHTS: str(weights.path), **files}, spec)
            return
        if not isinstance(self.tracker, MlflowTracker):
            return
        with tempfile.TemporaryDirectory(prefix="potion-weights-") as tmp:
            converted = save_tensors(Path(tmp) / MODEL_WEIGHTS, load_tensors(weights.path))
            self.tracker.log_model(name, {MODEL_WEIGHTS: str(converted), **files}, spec)


@contextmanager
def run_lifecycle(logger_cfg: Mapping[str, Any] | None, folder: Path, *, run_name: str, tags: Mapping[str, Any],
                  parent_run_id: str | None = None, tracker: Tracker | None = None,
                  config: Any = None) -> Iterator[RunOutputs]:
    """Track one run of work writing into ``folder``: FINISHED when the block ends, FAILED on an error,
    KILLED on SIGTERM or Ctrl+C.

    The run starts as the ``logger`` config says (a dead server or a bad URI fails here, before any work),
    unless ``tracker`` is given (a run started elsewhere): then it gets ``tags`` and its final status.
    ``config`` (the run's whole config) becomes ``config.yaml`` unless the pipeline writes that file itself. The
    process's log records while the block runs become ``run.log``; a run that fails uploads them as that artifact.
    """
    if tracker is None:
        tracker = start_tracker(logger_cfg, experiment="potion", run_name=run_name, tags=tags,
                                parent_run_id=parent_run_id, capture_log=False)
    else:
        tracker.set_tags(tags)
    with captured_log() as capture, tracker:
        try:
            yield RunOutputs(Path(folder), tracker, run_name=run_name, config=config, log=capture)
        except BaseException:
            tracker.log_text(capture.text(), LOG_FILE)  # the failed run's log, for whoever reads it in the UI
            raise


def complete_sweep_parent(parent: Tracker, cfg: Any, sweep_dir: Path, final: Mapping[str, Any]) -> None:
    """A PTN sweep's parent run gets what every run has: ``config.yaml`` (written into the sweep folder) and its
    final run's dataset and model inputs; the final run's UI address is printed (the parent prints its own and the
    runs table when it finishes). Never raises."""
    try:
        parent.log_artifact(atomic_write_text(Path(sweep_dir) / MODEL_CONFIG, config_text(cfg)))
    except Exception as exc:  # noqa: BLE001 - the sweep's results are written either way
        log.warning("writing the sweep's config.yaml failed (%s: %s)", type(exc).__name__, exc)
    if isinstance(parent, MlflowTracker):
        parent.copy_inputs_from(final.get("mlflow_run_id"))
        print_run_links(parent.tracking_uri, parent.experiment_id, final.get("mlflow_run_id"), "final run", table=False)


def reuse_finished(logger_cfg: Mapping[str, Any] | None, folder: Path, summary: dict[str, Any], spec: FolderRun, *,
                   parent_run_id: str | None = None, tracker: Tracker | None = None) -> dict[str, Any]:
    """A finished run folder used again: its summary marked ``reused``, logged first if its store lacks it.

    With ``tracker`` (a sweep's final job) the folder is logged into it, and the sweeper decides whether the
    store needs it; otherwise the configured store is asked (:func:`potion.tracking.runs.ensure_logged`).
    """
    if tracker is not None:
        log_folder(tracker, folder, summary, spec)
    else:
        summary = ensure_logged(logger_cfg, folder, summary, spec, parent_run_id)
        _print_logged_run(logger_cfg, summary.get("mlflow_run_id"))
    return {**summary, "reused": True}


def _print_logged_run(logger_cfg: Mapping[str, Any] | None, run_id: Any) -> None:
    """Print where a reused run is in the UI (its store already checked by :func:`ensure_logged`); never raises."""
    settings = logger_settings(logger_cfg)
    if settings is None or not run_id:
        return
    try:
        uri = usable_uri(settings)
        client, _ = open_client(uri)
        experiment_id = client.get_run(str(run_id)).info.experiment_id
    except Exception as exc:  # noqa: BLE001 - only a convenience
        log.debug("no UI address for run %s: %s", run_id, exc)
        return
    print_run_links(uri, experiment_id, str(run_id))
