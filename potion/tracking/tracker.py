"""A run's tracker: what the pipeline logs to (params, metrics, artifacts, tags, inputs, a logged model).

Results are on disk before they are tracked, so once a run has started a failing MLflow call is one warning and
the work goes on (:class:`MlflowTracker`); only starting a run may raise, before any work is done. Explicit run ids
through ``MlflowClient``, never the fluent global run, so parent, child and several runs can live in one process.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, Self

from potion.core.errors import TrackingError
from potion.core.interrupt import Interrupted
from potion.core.io import one_line, plain
from potion.core.run_log import LOG_FILE, RunLog
from potion.tracking.client import download_run_artifacts, no_answer, open_client, usable_uri
from potion.tracking.extras import (
    DatasetRef,
    dataset_input,
    inputs_of,
    model_inputs_of,
    start_system_metrics,
    stop_system_metrics,
    ui_lines,
    upload_logged_model,
)
from potion.tracking.liveness import close_dead_runs, process_tags
from potion.tracking.params import flatten_params, sanitize_key, tag_text
from potion.tracking.uris import is_http, logger_settings, resolve_tracking_uri

__all__ = ["PARENT_TAG", "MlflowTracker", "NullTracker", "RecordingTracker", "Tracker", "download_run_artifacts",
           "print_run_links", "resolve_tracking_uri", "start_tracker"]

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"


class Tracker:
    """What the pipeline logs to: params, metrics, artifacts and tags of one run. Every call does nothing here
    (``logger=none``: :class:`NullTracker`); the MLflow and recording trackers override them.

    Use as a context manager to finish the run with FINISHED, FAILED or KILLED (SIGTERM, Ctrl+C) automatically
    (:func:`potion.pipelines.lifecycle.run_lifecycle` does).
    """

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (possibly nested) config as flat params."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at a step; None values are skipped."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Log a data set (a :class:`~potion.tracking.extras.DatasetRef` as a dict) as the run's dataset input,
        and the logged model of run ``source_run_id`` (the training run an unlearning run healed) as a model input.
        """

    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Register ``files`` (artifact name -> local path: ``model.safetensors``, ``config.yaml``) and ``spec``
        (written as ``model.json``) as an MLflow logged model this run produced."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as the run's artifact ``artifact_file``."""

    def finish(self, status: str = "FINISHED") -> None:
        """End the run; never raises."""

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """Start a nested run (tag ``mlflow.parentRunId``) in the same store and experiment; never raises."""
        return NullTracker()

    def discard(self) -> None:
        """Delete the run (a placeholder that got no content); never raises."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:  # SIGTERM (Interrupted) or Ctrl+C stopped the run: KILLED, as MLflow marks runs a user stopped
            self.finish("KILLED" if issubclass(exc_type, (Interrupted, KeyboardInterrupt)) else "FAILED")


class NullTracker(Tracker):
    """``logger=none``: tracking switched off; every call does nothing."""


class RecordingTracker(Tracker):
    """Records a run's tracking calls as plain data instead of writing them, for another process to replay.

    A PTN sweep's final job logs through one of these (its run already created by the sweeper, whose id
    it carries), returns :attr:`calls` with its result, and the sweeper replays them into that run
    (:meth:`replay`): the jobs never import MLflow or reach the store, and a sqlite store keeps one writer.
    Artifacts are recorded as paths, so the replaying process must see the job's files (the same machine,
    or the shared filesystem a cluster sweep uses anyway).
    """

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id
        self.calls: list[tuple[str, Any]] = []
        self.status: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record the flattened params."""
        self.calls.append(("params", flatten_params(params)))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Record the metrics as plain numbers (tensors and numpy scalars unwrapped)."""
        values = {str(k): v.item() if hasattr(v, "item") else v for k, v in metrics.items() if v is not None}
        self.calls.append(("metrics", (values, step)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Record the artifact's absolute path."""
        self.calls.append(("artifact", (os.path.abspath(os.fspath(path)), artifact_path)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record the tags as text."""
        self.calls.append(("tags", {str(k): tag_text(v) for k, v in tags.items()}))

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Record the inputs (the training run's model is looked up when the calls are replayed)."""
        self.calls.append(("inputs", {"dataset": plain(dict(dataset)) if dataset else None, "context": context,
                                      "source_run_id": source_run_id}))

    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Record the model's files as absolute paths and its spec."""
        self.calls.append(("model", {"name": name, "spec": plain(dict(spec)),
                                     "files": {str(k): os.path.abspath(os.fspath(v)) for k, v in files.items()}}))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Record the text."""
        self.calls.append(("text", {"text": text, "artifact_file": artifact_file}))

    def finish(self, status: str = "FINISHED") -> None:
        """Record the final status (the first one given)."""
        if self.status is None:
            self.status = status

    def discard(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()

    @staticmethod
    def replay(calls: Sequence[tuple[str, Any]], into: Tracker) -> None:
        """Apply recorded ``calls`` (from :attr:`calls`, maybe sent from another process) to ``into``, in order."""
        for kind, args in calls:
            if kind == "params":
                into.log_params(args)
            elif kind == "metrics":
                into.log_metrics(args[0], step=args[1])
            elif kind == "artifact":
                into.log_artifact(args[0], args[1])
            elif kind == "tags":
                into.set_tags(args)
            elif kind == "inputs":
                into.log_inputs(args["dataset"], args.get("context"), args.get("source_run_id"))
            elif kind == "model":
                into.log_model(args["name"], args["files"], args["spec"])
            elif kind == "text":
                into.log_text(args["text"], args["artifact_file"])
            else:
                raise ValueError(f"unknown recorded tracking call {kind!r}")


class MlflowTracker(Tracker):
    """One MLflow run, driven through ``MlflowClient`` with its explicit run id.

    After the start every call is guarded: an exception becomes one warning per kind and the run
    goes on. A call that a server did not answer (MLflow gave up after its HTTP retries) switches tracking off
    for the rest of the run, so the work is not held up. :attr:`failed` tells afterwards whether everything
    reached the store.
    """

    def __init__(self, client: Any, run_id: str, tracking_uri: str, experiment_id: str) -> None:
        self._client = client
        self.run_id = run_id
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self._warned: set[tuple[str, str]] = set()
        self._disabled = False
        self._finished = False
        self.failed = False  # some call did not reach the store
        self.offline = False  # the server stopped answering; tracking is off
        self.announce = ""  # what to call the run when printing its UI address at the end ("": not printed)
        self._monitor: Any = None  # MLflow's system metrics monitor, when logger.system_metrics=true
        self._log: RunLog | None = None  # the process's console while the run lasts, uploaded as run.log

    @property
    def client(self) -> Any:
        """The MlflowClient this run is written through (for lookups in the same store)."""
        return self._client

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
    ) -> MlflowTracker:
        """Create (or reuse) the experiment and create the run; failures raise one TrackingError line."""
        run_tags = default_tags(tags)
        if parent_run_id:
            run_tags[PARENT_TAG] = str(parent_run_id)
        try:
            client, experiment_id = open_client(tracking_uri, experiment)
            close_dead_runs(client, experiment_id)
            run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        except TrackingError:
            raise
        except Exception as exc:  # every store failure means the same to the user
            raise TrackingError(
                f"cannot start an MLflow run in experiment {experiment!r} at {tracking_uri} ({one_line(exc)}); "
                "fix logger.tracking_uri or use logger=none"
            ) from exc
        return cls(client, run.info.run_id, tracking_uri, experiment_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested config as flattened params (``log_batch`` splits them into MLflow's batch sizes)."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        if items:
            self._guard("log_params", lambda: self._client.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers (python, numpy or one-element tensors) at ``step``; None values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = self._as_float(key, value)
            if number is not None:
                items.append(Metric(sanitize_key(key), number, now, int(step or 0)))
        if items:
            self._guard("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=items))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or a whole folder into the run's artifacts."""
        self._guard("log_artifact", lambda: self._client.log_artifact(self.run_id, os.fspath(path), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, cut to MLflow's limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_key(k), tag_text(v)) for k, v in tags.items()]
        if items:
            self._guard("set_tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Log the data set as a dataset input and the training run's logged model (if any) as a model input."""
        self._guard("log_inputs", lambda: self._send_inputs(
            [dataset_input(DatasetRef.from_dict(dataset), context)] if dataset else [],
            model_inputs_of(self._client, source_run_id)))

    def copy_inputs_from(self, run_id: str | None) -> None:
        """Repeat another run's dataset and model inputs on this run (a sweep's parent takes its final run's)."""
        self._guard("log_inputs", lambda: self._send_inputs(*inputs_of(self._client, run_id)))

    def _send_inputs(self, datasets: list[Any], models: list[Any]) -> None:
        if datasets or models:
            self._client.log_inputs(self.run_id, datasets=datasets, models=models)

    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Register the files as an MLflow logged model of this run (see :func:`upload_logged_model`)."""
        self._guard("log_model", lambda: upload_logged_model(self._client, str(self.experiment_id), str(self.run_id),
                                                             name, files, spec))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as the artifact ``artifact_file``."""
        self._guard("log_text", lambda: self._client.log_text(self.run_id, text, artifact_file))

    def start_system_metrics(self, interval_s: float) -> None:
        """Sample CPU, memory, disk, network (and GPU) into ``system/*`` metrics until the run finishes."""
        if self._monitor is None and not self._disabled:
            self._monitor = start_system_metrics(str(self.run_id), self.tracking_uri, interval_s)

    def capture_log(self) -> None:
        """Keep the process's console (log records, standard streams) from now until the run finishes, then upload
        it as ``run.log``."""
        if self._log is None:
            self._log = RunLog()
            self._log.attach()

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``status``; a second call does nothing; never raises.

        First the system metrics monitor stops and the captured log is uploaded; a command's own run then prints
        where it is in the UI.
        """
        if self._finished:
            return
        self._finished = True
        stop_system_metrics(self._monitor, str(self.run_id))
        self._monitor = None
        if self._log is not None:
            self._log.detach()
            text, self._log = self._log.text(), None
            self.log_text(text, LOG_FILE)
        self._guard("finish", lambda: self._client.set_terminated(self.run_id, status))
        if self.announce:
            print_run_links(self.tracking_uri, self.experiment_id, self.run_id, self.announce)

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """A nested run through this run's client (no new connection, no experiment lookup).

        A failure is one warning and a tracker that does nothing, as for every call after the start.
        """
        run_tags = {**default_tags(tags), PARENT_TAG: str(self.run_id)}
        created: list[Any] = []
        self._guard("child run", lambda: created.append(
            self._client.create_run(self.experiment_id, run_name=run_name, tags=run_tags)))
        if not created:
            return NullTracker()
        return MlflowTracker(self._client, created[0].info.run_id, self.tracking_uri, self.experiment_id)

    def discard(self) -> None:
        """Delete this run from the store (it stays restorable with ``mlflow runs restore``)."""
        self._finished = True
        self._guard("discard", lambda: self._client.delete_run(self.run_id))

    def _guard(self, kind: str, call: Any) -> None:
        """Run one MLflow call; turn its failure into a single warning per kind (tracking off: no server)."""
        if self._disabled:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the run
            self.failed = True
            self._warn_once((kind, type(exc).__name__), f"MLflow {kind} failed for run {self.run_id} "
                            f"({type(exc).__name__}: {one_line(exc)}); the run goes on, further such failures "
                            "are not reported")
            if is_http(self.tracking_uri) and no_answer(exc):
                self._disabled = self.offline = True
                log.warning(
                    "MLflow tracking server %s stopped answering: tracking is off for the rest of run %s; results "
                    "are still written to the run folder, and rerunning the same command once the server is back "
                    "logs a finished run the store lacks", self.tracking_uri, self.run_id)

    def _warn_once(self, key: tuple[str, str], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _as_float(self, key: str, value: Any) -> float | None:
        if value is None:
            return None
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError) as exc:
            self._warn_once(("metric", key), f"metric {key!r} skipped: {value!r:.80} is not a number ({one_line(exc)})")
            return None
        return number  # NaN and inf are kept: MLflow stores them and they flag a diverged run


def default_tags(tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """MLflow's default run tags (source, user, git commit: what the fluent API adds), this process's, and ``tags``."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags({**process_tags(), **{str(k): tag_text(v) for k, v in (tags or {}).items()}})


def print_run_links(tracking_uri: str | None, experiment_id: str | None, run_id: str | None, what: str = "run",
                    table: bool = True) -> None:
    """Print where a run is in the MLflow UI (its page, and the runs table unless ``table`` is false)."""
    for line in ui_lines(str(tracking_uri or ""), experiment_id, run_id, what, table=table):
        print(line, flush=True)


def start_tracker(
    logger_cfg: Mapping[str, Any] | None,
    *,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    capture_log: bool = True,
    what: str = "run",
) -> Tracker:
    """Start tracking one run of a command as the ``logger`` config says (read by
    :func:`~potion.tracking.uris.logger_settings`; ``logger=none``: a :class:`NullTracker`), failing in one line
    before work begins.

    ``capture_log``: upload the process's log records as ``run.log`` when the run finishes (unless the caller
    writes that file itself). The run prints its UI address, called ``what`` (``run``, ``sweep parent run``), then.
    """
    settings = logger_settings(logger_cfg)
    if settings is None:
        return NullTracker()
    uri = usable_uri(settings)
    tracker = MlflowTracker.start(uri, settings.experiment or experiment, run_name=run_name, tags=tags,
                                  parent_run_id=parent_run_id)
    tracker.announce = what
    if capture_log:
        tracker.capture_log()
    if settings.system_metrics:
        tracker.start_system_metrics(settings.system_metrics_interval_s)
    return tracker
