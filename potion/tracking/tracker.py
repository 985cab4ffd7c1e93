"""MLflow tracking behind a small Tracker interface.

Results are written to disk first and tracked second: once a run has started, a failing MLflow call
is logged as a warning (once per kind) and the work goes on; ``finish`` never raises. Starting a run
(resolving the store, creating the experiment and the run) may raise a one-line ``TrackingError``, so
a wrong URI or a dead server shows up before any work is done.

The tracking URI is always explicit: the default is an embedded sqlite store in the working folder,
``http(s)://`` points at a shared server, and ``file:`` stores (deprecated in MLflow) are refused. A sqlite
store is created, migrated (and repaired) under an inter-process lock (:mod:`potion.tracking.store`), so
commands started together on a new store all succeed. Calls to a server give up after about
``logger.timeout_s`` seconds (MLflow's own retries would take minutes), and a server that stops answering
switches tracking off for the rest of the run: the results are in the run folder, and rerunning the same
command logs a finished run that its store lacks. Runs carry the host and process that created them, so a
run left RUNNING by a killed process is closed as KILLED by the next potion process on that host.
The client API with explicit run ids is used throughout, never the global fluent ``mlflow.start_run``
state, so parent and child runs and several trackers can live in one process. ``mlflow`` is imported
lazily because it is slow to import.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from potion.core.errors import ConfigError, TrackingError
from potion.core.interrupt import Interrupted
from potion.core.run_log import LOG_FILE, RunLog
from potion.tracking.extras import (
    DatasetRef,
    dataset_input,
    git_source_tags,
    inputs_of,
    model_inputs_of,
    start_system_metrics,
    stop_system_metrics,
    ui_lines,
    upload_logged_model,
)
from potion.tracking.store import inspect_store, is_unfinished_and_empty, repair_store, set_aside, store_lock

log = logging.getLogger(__name__)

MAX_PARAM_VALUE = 6000  # MLflow's param value limit
MAX_TAG_VALUE = 8000  # MLflow's tag value limit
MAX_KEY = 250  # MLflow's param/metric/tag key limit
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit for params and tags
METRICS_PER_BATCH = 1000  # MLflow's log_batch limit for metrics
PARENT_TAG = "mlflow.parentRunId"
STALL_SECONDS = 30.0  # a failing call this slow means retries against a dead server: stop tracking
DEFAULT_TIMEOUT_S = 60.0  # logger.timeout_s when a config has none: how long one call to a server may try
DEFAULT_SYSTEM_METRICS_INTERVAL_S = 10.0  # logger.system_metrics_interval_s when a config has none
HEALTH_TIMEOUT_S = 3.0  # the reachability check's own limit
HOST_TAG, PID_TAG, PID_START_TAG = "potion.host", "potion.pid", "potion.pid_start"  # who created a run
_SQLITE = "sqlite:///"
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")


# --------------------------------------------------------------------------- URIs and reachability


def resolve_tracking_uri(uri: str | None) -> str:
    """Make a tracking URI explicit and absolute, so every process logs to the same store.

    None or "" becomes ``sqlite:///<cwd>/mlflow.db``; a relative sqlite path is made absolute against
    the working folder; http(s) and other server URIs pass unchanged; ``file:`` stores and bare paths
    (which MLflow reads as the deprecated file store) raise TrackingError.
    """
    uri = (uri or "").strip()
    if not uri:
        return _sqlite_uri(Path.cwd() / "mlflow.db")
    if uri.startswith(_SQLITE):
        return _resolve_sqlite(uri)
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which current MLflow no longer supports; "
            "use an embedded store such as sqlite:///mlflow.db or a server URI http://host:port"
        )
    return uri


def _resolve_sqlite(uri: str) -> str:
    path = uri[len(_SQLITE) :]
    if not path or path.startswith(":memory:"):
        raise TrackingError(f"tracking URI {uri!r} names no database file; use e.g. sqlite:///mlflow.db")
    return _sqlite_uri(Path(path).expanduser().absolute())


def _sqlite_uri(path: Path) -> str:
    return _SQLITE + path.as_posix()  # an absolute path gives the four-slash form sqlite:////abs/db


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI, None for any other URI."""
    return Path(uri[len(_SQLITE) :]) if uri.startswith(_SQLITE) else None


def is_http(uri: str) -> bool:
    """Whether the URI points at a tracking server (which can be down) rather than an embedded store."""
    return uri.startswith(("http://", "https://"))


def check_reachable(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Fail fast, in one line, when a store cannot be used, instead of MLflow retrying for minutes.

    For http(s) servers this asks ``<uri>/health``; for sqlite it makes sure the database folder exists
    and is writable. Other schemes are left to MLflow.
    """
    if is_http(uri):
        reason = _server_problem(uri, timeout)
        if reason is not None:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
                "--port N --backend-store-uri sqlite:///mlflow.db), fix logger.tracking_uri, set logger.fallback=local "
                "to log to the local sqlite store instead, or logger=none"
            )
        return
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite_folder(db)


def _server_problem(uri: str, timeout: float) -> str | None:
    """Why the server at ``uri`` cannot be used, or None when it answers."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read(64)
    except urllib.error.HTTPError as exc:
        # Any answer below 500 (e.g. 401 from an auth proxy) means a server is there; MLflow reports the rest.
        return f"HTTP {exc.code} from {url}" if exc.code >= 500 else None
    except urllib.error.URLError as exc:
        return _one_line(exc.reason)
    except (OSError, ValueError) as exc:  # timeouts, resets, malformed URLs
        return _one_line(exc)
    return None


def _check_sqlite_folder(db: Path) -> None:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"cannot create the folder of the MLflow store {db} ({_one_line(exc)})") from exc
    if not os.access(db.parent, os.W_OK):
        raise TrackingError(f"the folder of the MLflow store {db} is not writable; choose another logger.tracking_uri")


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- the logger config


@dataclass(frozen=True)
class LoggerSettings:
    """The checked ``logger`` config: where to log, what to do when the server is down, how long calls may try."""

    tracking_uri: str
    fallback: str
    experiment: str | None
    timeout_s: float | None  # None: MLflow's own HTTP retry settings (minutes against a dead server)
    system_metrics: bool = False  # MLflow's system metrics monitor (CPU, memory, GPU, ...) on every run
    system_metrics_interval_s: float = DEFAULT_SYSTEM_METRICS_INTERVAL_S


def logger_settings(logger_cfg: Mapping[str, Any] | None) -> LoggerSettings | None:
    """The checked ``logger`` config, None for ``logger=none`` (or no config); a bad value raises one line.

    Keys: ``name`` (mlflow or none), ``tracking_uri``, ``fallback`` (none or local), ``experiment``,
    ``timeout_s``, ``system_metrics`` and ``system_metrics_interval_s``. Used before a run starts and also when a
    finished run is reused, so that a wrong URI or fallback never passes silently.
    """
    cfg = dict(logger_cfg or {"name": "none"})
    name = str(cfg.get("name") or "none").lower()
    if name in ("none", "null", "off"):
        return None
    if name != "mlflow":
        raise ConfigError(f"unknown logger.name {name!r}; use mlflow or none")
    fallback = str(cfg.get("fallback") or "none").lower()
    if fallback not in ("none", "local"):
        raise ConfigError(f"unknown logger.fallback {fallback!r}; use none or local")
    timeout = _timeout(cfg.get("timeout_s", DEFAULT_TIMEOUT_S))
    experiment = cfg.get("experiment")
    system = cfg.get("system_metrics", False)
    if not isinstance(system, bool):
        raise ConfigError(f"logger.system_metrics={system!r}: must be true or false")
    interval = _timeout(cfg.get("system_metrics_interval_s", DEFAULT_SYSTEM_METRICS_INTERVAL_S),
                        "logger.system_metrics_interval_s", "how often system metrics are sampled")
    return LoggerSettings(resolve_tracking_uri(cfg.get("tracking_uri")), fallback,
                          str(experiment) if experiment not in (None, "") else None, timeout, system,
                          interval or DEFAULT_SYSTEM_METRICS_INTERVAL_S)


def tracking_enabled(logger_cfg: Mapping[str, Any] | None) -> bool:
    """Whether the ``logger`` config asks for tracking at all (``logger=none`` does not); values unchecked."""
    name = str((logger_cfg or {}).get("name") or "none").lower()
    return name not in ("none", "null", "off")


def _timeout(value: Any, key: str = "logger.timeout_s",
             meaning: str = "how long one call to a tracking server may try") -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value) if not isinstance(value, bool) else float("nan")
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (seconds > 0 and seconds != float("inf")):
        null = ", or null for MLflow's own retries" if key == "logger.timeout_s" else ""
        raise ConfigError(f"{key}={value!r}: must be a positive number of seconds ({meaning}){null}")
    return seconds


def http_settings(timeout_s: float) -> dict[str, str]:
    """MLflow's HTTP settings under which one tracking call gives up within about ``timeout_s`` seconds.

    Below 10 s: one attempt of that length. Otherwise three attempts sharing the time, with short backoff
    sleeps between them (0 s, then 2 s, each plus up to 0.5 s jitter), so a server that restarts
    quickly is not given up on at the first refused connection.
    """
    if timeout_s < 10:
        retries, per_attempt = 0, max(1, int(timeout_s))
    else:
        retries, per_attempt = 2, max(1, int((timeout_s - 3) // 3))
    return {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(per_attempt), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5"}


def apply_timeout(timeout_s: float | None) -> None:
    """Make this process's (and its child processes') MLflow calls give up after about ``timeout_s`` seconds.

    MLflow reads these environment variables at every request; None leaves them as they are.
    """
    if timeout_s is not None:
        os.environ.update(http_settings(timeout_s))


# --------------------------------------------------------------------------- params


def flatten_params(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Turn a nested config into the flat, string-valued params MLflow accepts.

    Nested mappings become dotted keys, sequences their JSON text; keys are sanitised and values cut
    to MLflow's limits, so logging a whole config never fails on one odd entry.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[sanitize_key(name)] = _param_text(value)[:MAX_PARAM_VALUE]
    return flat


def _param_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | Sequence) and not isinstance(value, bytes | bytearray):
        return json.dumps(_plain(value), default=str)
    return str(value)


def print_run_links(tracking_uri: str | None, experiment_id: str | None, run_id: str | None, what: str = "run") -> None:
    """Print where a run is in the MLflow UI (its page and the runs table), for stores that have a UI."""
    for line in ui_lines(str(tracking_uri or ""), experiment_id, run_id, what):
        print(line, flush=True)


def _plain(value: Any) -> Any:
    """Nested mappings/sequences (including OmegaConf containers) as dicts and lists for JSON."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray):
        return [_plain(v) for v in value]
    return value


def sanitize_key(key: str) -> str:
    """A key MLflow accepts: only alphanumerics, ``_ - . space /``, no empty or dot path segments."""
    key = _BAD_KEY_CHARS.sub("_", str(key))
    parts = [p if p != ".." else "__" for p in key.split("/") if p not in ("", ".")]
    return "/".join(parts)[:MAX_KEY] or "_"


# --------------------------------------------------------------------------- trackers


class Tracker(ABC):
    """What the pipeline logs to: params, metrics, artifacts and tags of one run.

    Use as a context manager to finish the run with FINISHED, FAILED or KILLED (SIGTERM, Ctrl+C) automatically
    (:func:`potion.pipelines.lifecycle.run_lifecycle` does).
    """

    run_id: str | None = None
    tracking_uri: str | None = None
    experiment_id: str | None = None

    @abstractmethod
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (possibly nested) config as flat params."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics at a step; None values are skipped."""

    @abstractmethod
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set string tags on the run."""

    @abstractmethod
    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Log a data set (a :class:`~potion.tracking.extras.DatasetRef` as a dict) as the run's dataset input,
        and the logged model of run ``source_run_id`` (the training run an unlearning run healed) as a model input.
        """

    @abstractmethod
    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Register ``files`` (artifact name -> local path: ``model.safetensors``, ``config.yaml``) and ``spec``
        (written as ``model.json``) as an MLflow logged model this run produced."""

    @abstractmethod
    def log_text(self, text: str, artifact_file: str) -> None:
        """Write ``text`` as the run's artifact ``artifact_file``."""

    @abstractmethod
    def finish(self, status: str = "FINISHED") -> None:
        """End the run; never raises."""

    @abstractmethod
    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """Start a nested run (tag ``mlflow.parentRunId``) in the same store and experiment; never raises."""

    @abstractmethod
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

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Do nothing."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Do nothing."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Do nothing."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Do nothing."""

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Do nothing."""

    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Do nothing."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Do nothing."""

    def finish(self, status: str = "FINISHED") -> None:
        """Do nothing."""

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """Another tracker that does nothing."""
        return NullTracker()

    def discard(self) -> None:
        """Do nothing."""


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
        plain = {str(k): v.item() if hasattr(v, "item") else v for k, v in metrics.items() if v is not None}
        self.calls.append(("metrics", (plain, step)))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Record the artifact's absolute path."""
        self.calls.append(("artifact", (os.path.abspath(os.fspath(path)), artifact_path)))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Record the tags as text."""
        self.calls.append(("tags", {str(k): _tag_text(v) for k, v in tags.items()}))

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Record the inputs (the training run's model is looked up when the calls are replayed)."""
        self.calls.append(("inputs", {"dataset": _plain(dict(dataset)) if dataset else None, "context": context,
                                      "source_run_id": source_run_id}))

    def log_model(self, name: str, files: Mapping[str, str], spec: Mapping[str, Any]) -> None:
        """Record the model's files as absolute paths and its spec."""
        self.calls.append(("model", {"name": name, "spec": _plain(dict(spec)),
                                     "files": {str(k): os.path.abspath(os.fspath(v)) for k, v in files.items()}}))

    def log_text(self, text: str, artifact_file: str) -> None:
        """Record the text."""
        self.calls.append(("text", {"text": text, "artifact_file": artifact_file}))

    def finish(self, status: str = "FINISHED") -> None:
        """Record the final status (the first one given)."""
        if self.status is None:
            self.status = status

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """Nested runs are not recorded: a tracker that does nothing."""
        return NullTracker()

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
    goes on. A failing call against a server that no longer answers its health check, or one that
    stalls for ``STALL_SECONDS``, switches tracking off for the rest of the run so the work is not held
    up. :attr:`failed` tells afterwards whether everything reached the store.
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
        self.announce = False  # print the run's UI address when it finishes (a command's own run)
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
        run_tags = {**_default_tags(), **{str(k): _tag_text(v) for k, v in (tags or {}).items()}}
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
                f"cannot start an MLflow run in experiment {experiment!r} at {tracking_uri} ({_one_line(exc)}); "
                "fix logger.tracking_uri or use logger=none"
            ) from exc
        return cls(client, run.info.run_id, tracking_uri, experiment_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested config as flattened params, in batches of MLflow's size limit."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten_params(params).items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            self._guard("log_params", lambda b=batch: self._client.log_batch(self.run_id, params=b))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numbers (python, numpy or one-element tensors) at ``step``; None values are skipped."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            number = self._as_float(key, value)
            if number is not None:
                items.append(Metric(sanitize_key(key), number, now, int(step or 0)))
        for batch in _chunks(items, METRICS_PER_BATCH):
            self._guard("log_metrics", lambda b=batch: self._client.log_batch(self.run_id, metrics=b))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file or a whole folder into the run's artifacts."""
        self._guard("log_artifact", lambda: self._client.log_artifact(self.run_id, os.fspath(path), artifact_path))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, cut to MLflow's limit)."""
        from mlflow.entities import RunTag

        items = [RunTag(sanitize_key(k), _tag_text(v)) for k, v in tags.items()]
        for batch in _chunks(items, PARAMS_PER_BATCH):
            self._guard("set_tags", lambda b=batch: self._client.log_batch(self.run_id, tags=b))

    def log_inputs(self, dataset: Mapping[str, Any] | None, context: str | None = None,
                   source_run_id: str | None = None) -> None:
        """Log the data set as a dataset input and the training run's logged model (if any) as a model input."""
        def call() -> None:
            datasets = [dataset_input(DatasetRef.from_dict(dataset), context)] if dataset else []
            models = model_inputs_of(self._client, source_run_id)
            if datasets or models:
                self._client.log_inputs(self.run_id, datasets=datasets, models=models)

        self._guard("log_inputs", call)

    def copy_inputs_from(self, run_id: str | None) -> None:
        """Repeat another run's dataset and model inputs on this run (a sweep's parent takes its final run's)."""
        def call() -> None:
            datasets, models = inputs_of(self._client, run_id)
            if datasets or models:
                self._client.log_inputs(self.run_id, datasets=datasets, models=models)

        self._guard("log_inputs", call)

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
        stop_system_metrics(self._monitor)
        self._monitor = None
        if self._log is not None:
            self._log.detach()
            text, self._log = self._log.text(), None
            self.log_text(text, LOG_FILE)
        self._guard("finish", lambda: self._client.set_terminated(self.run_id, status))
        if self.announce:
            print_run_links(self.tracking_uri, self.experiment_id, self.run_id)

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """A nested run through this run's client (no new connection, no experiment lookup).

        A failure is one warning and a tracker that does nothing, as for every call after the start.
        """
        run_tags = {**_default_tags(), **{str(k): _tag_text(v) for k, v in (tags or {}).items()},
                    PARENT_TAG: str(self.run_id)}
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
        """Run one MLflow call; turn its failure into a single warning per kind."""
        if self._disabled:
            return
        started = time.monotonic()
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop the run
            self.failed = True
            self._warn_once(kind, exc)
            gone = _server_problem(self.tracking_uri, HEALTH_TIMEOUT_S) if is_http(self.tracking_uri) else None
            if gone is not None:
                self._disabled = self.offline = True
                log.warning(
                    "MLflow tracking server %s stopped answering (%s): tracking is off for the rest of run %s; "
                    "results are still written to the run folder, and rerunning the same command once the server "
                    "is back logs a finished run the store lacks",
                    self.tracking_uri, gone, self.run_id,
                )
            elif time.monotonic() - started > STALL_SECONDS:
                self._disabled = True
                log.warning(
                    "MLflow tracking is off for the rest of run %s: %s stalled for over %.0f s "
                    "(results are still written to the run folder)",
                    self.run_id,
                    kind,
                    STALL_SECONDS,
                )

    def _warn_once(self, kind: str, exc: BaseException) -> None:
        self._warn_once_text(
            (kind, type(exc).__name__),
            f"MLflow {kind} failed for run {self.run_id} ({type(exc).__name__}: {_one_line(exc)}); "
            "the run goes on, further such failures are not reported",
        )

    def _warn_once_text(self, key: tuple[str, str], message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)

    def _as_float(self, key: str, value: Any) -> float | None:
        if value is None:
            return None
        try:
            number = float(value.item() if hasattr(value, "item") else value)
        except (TypeError, ValueError, RuntimeError) as exc:
            self._warn_once_text(
                ("metric", key), f"metric {key!r} skipped: {value!r:.80} is not a number ({_one_line(exc)})"
            )
            return None
        return number  # NaN and inf are kept: MLflow stores them and they flag a diverged run


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _tag_text(value: Any) -> str:
    return str(value)[:MAX_TAG_VALUE]


def _default_tags() -> dict[str, str]:
    """The source, git and user tags the fluent API would add, so runs read the same in the UI, and the process's.

    The git commit is that of the checkout holding the ``potion`` package (none when installed elsewhere).
    """
    tags = {"mlflow.source.name": os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python",
            **git_source_tags(), **process_tags()}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (OSError, KeyError):  # no user entry in some containers: leave the tag out
        return tags
    return tags


# --------------------------------------------------------------------------- runs left by killed processes


def process_tags() -> dict[str, str]:
    """This process as run tags (host, pid and the pid's start time), so a later process can tell it died."""
    pid = os.getpid()
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(pid)}
    start = _process_start(pid)
    if start:
        tags[PID_START_TAG] = start
    return tags


def _process_start(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc``); '' where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()  # the command name in parentheses may hold spaces
    return fields[19] if len(fields) > 19 else ""


def process_alive(tags: Mapping[str, str]) -> bool | None:
    """Whether the process that created a run (from its tags) still runs; None when this host cannot tell.

    A pid now used by another process (a different start time) counts as dead.
    """
    host, pid = tags.get(HOST_TAG), str(tags.get(PID_TAG, ""))
    if not host or host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start, now = tags.get(PID_START_TAG, ""), _process_start(int(pid))
    return not (start and now and start != now)


def close_dead_runs(client: Any, experiment_id: str) -> list[str]:
    """Close as KILLED the runs of an experiment left RUNNING by processes of this host that have died.

    Such runs (a SIGKILLed train.py, a sweep parent, its placeholder child) would otherwise read as running
    forever. Runs of other hosts are left alone (their processes cannot be seen from here). Never raises.
    """
    host = socket.gethostname().replace("'", "")
    query = f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    try:
        runs = client.search_runs([experiment_id], filter_string=query, max_results=1000)
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.debug("looking for runs left RUNNING failed: %s", exc)
        return []
    closed = [r.info.run_id for r in runs if process_alive(r.data.tags) is False and _close_killed(client, r)]
    if closed:
        log.warning("closed %d MLflow run(s) left RUNNING by a killed process on this host as KILLED: %s",
                    len(closed), ", ".join(closed))
    return closed


def _close_killed(client: Any, run: Any) -> bool:
    try:
        client.set_terminated(run.info.run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - housekeeping only
        log.debug("closing run %s failed: %s", run.info.run_id, exc)
        return False
    return True


def open_client(uri: str, experiment: str | None = None) -> tuple[Any, str | None]:
    """An MlflowClient for ``uri`` with its store ready, and the id of ``experiment`` (created if missing).

    A sqlite store is created, migrated or repaired while this process holds the store's lock (see
    :mod:`potion.tracking.store`), so processes opening a new store at once do not race MLflow's
    migration; MLflow keeps the opened store for the rest of the process. Failures raise one line.
    """
    db = sqlite_path(uri)
    with store_lock(db):
        if db is not None and repair_store(db, uri):
            _forget_engine(uri)
        try:
            return _ready_client(uri, experiment)
        except TrackingError:
            raise
        except Exception as exc:  # a corrupt or foreign database, a refused connection, ...
            if db is None or not is_unfinished_and_empty(inspect_store(db)):
                raise TrackingError(f"cannot open the MLflow store {uri} ({_one_line(exc)}); fix "
                                    "logger.tracking_uri or use logger=none") from exc
            set_aside(db, f"an unfinished schema migration ({_one_line(exc)})")
            _forget_engine(uri)
        return _ready_client(uri, experiment)


def _forget_engine(uri: str) -> None:
    """Close the database connections MLflow keeps for ``uri`` (they would still read a file moved aside)."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # its per-URI engine cache

        engine = SqlAlchemyStore._engine_map.pop(uri, None)
    except (ImportError, AttributeError):
        return
    if engine is not None:
        engine.dispose()


def _ready_client(uri: str, experiment: str | None) -> tuple[Any, str | None]:
    client = _import_mlflow().MlflowClient(tracking_uri=uri)
    if experiment is None:
        client.search_experiments(max_results=1)  # builds (creates, migrates) the store now, under the lock
        return client, None
    return client, _ensure_experiment(client, experiment, uri)


def _ensure_experiment(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing (tolerating a parallel process creating it first)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(tracking_uri, name))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} (id {experiment.experiment_id}) at {tracking_uri} is deleted; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or choose another "
            "logger.experiment"
        )
    return experiment.experiment_id


def _artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Keep a sqlite store's artifacts beside its database, not in whatever folder the process runs in."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None  # a server decides where artifacts go
    folder = re.sub(r"[^\w.-]", "_", experiment).strip(".") or "experiment"
    return (db.parent / "mlruns" / folder).as_uri()


def _import_mlflow() -> Any:
    """Import mlflow on first use (it is slow) and quieten its info chatter and internal deprecation notices."""
    for key, value in http_settings(DEFAULT_TIMEOUT_S).items():  # bounded calls also where no logger config is read
        os.environ.setdefault(key, value)
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's own use of deprecated SQLAlchemy/library APIs is nothing our users can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow(\.|$)")
    return mlflow


# --------------------------------------------------------------------------- entry points


def start_tracker(
    logger_cfg: Mapping[str, Any] | None,
    *,
    experiment: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    capture_log: bool = True,
) -> Tracker:
    """Start tracking one run of a command as the ``logger`` config says, failing in one line before work begins.

    ``logger_cfg`` keys: ``name`` (``mlflow`` or ``none``; a missing config means none),
    ``tracking_uri``, ``fallback`` (``none`` or ``local``: on an unreachable server, log to the local
    sqlite store instead), ``experiment`` (overrides the experiment name), ``timeout_s`` (how long
    one call to a server may try; see :func:`http_settings`), ``system_metrics`` (MLflow's system metrics
    monitor) and ``system_metrics_interval_s``. ``capture_log``: upload the process's log records as ``run.log``
    when the run finishes (``potion.pipelines.lifecycle`` writes that file into the run folder itself). The run prints
    its UI address when it finishes.
    """
    settings = logger_settings(logger_cfg)
    if settings is None:
        return NullTracker()
    uri = usable_uri(settings)
    tracker = MlflowTracker.start(uri, settings.experiment or experiment, run_name=run_name, tags=tags,
                                  parent_run_id=parent_run_id)
    tracker.announce = True
    if capture_log:
        tracker.capture_log()
    if settings.system_metrics:
        tracker.start_system_metrics(settings.system_metrics_interval_s)
    return tracker


def usable_uri(settings: LoggerSettings) -> str:
    """The store to log to: the configured one when it answers, else (fallback=local) the local sqlite store.

    Also sets the HTTP timeout of this process's MLflow calls (``logger.timeout_s``).
    """
    apply_timeout(settings.timeout_s)
    limit = min(HEALTH_TIMEOUT_S, settings.timeout_s or HEALTH_TIMEOUT_S)
    return _reachable_uri(settings.tracking_uri, settings.fallback, limit)


def _reachable_uri(uri: str, fallback: str, timeout: float = HEALTH_TIMEOUT_S) -> str:
    """``uri`` when usable, else (with fallback=local and a server URI) the local sqlite store."""
    try:
        check_reachable(uri, timeout)
        return uri
    except TrackingError:
        if fallback != "local" or not is_http(uri):
            raise
    local = resolve_tracking_uri(None)
    log.warning("MLflow tracking server %s is unreachable; falling back to the local sqlite store %s", uri, local)
    check_reachable(local)
    return local


def download_run_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dst: str | os.PathLike) -> Path:
    """Fetch ``artifact_path`` of a finished run (``mlflow:<run id>`` inputs) into ``dst``; return the local path."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    client, _ = open_client(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # unknown id, malformed id and store errors read the same
        raise TrackingError(f"unknown MLflow run id {run_id!r} in {uri} ({_one_line(exc)})") from exc
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, artifact_path, os.fspath(dst)))
    except Exception as exc:
        raise TrackingError(
            f"cannot download artifact {artifact_path!r} of MLflow run {run_id} from {uri} ({_one_line(exc)})"
        ) from exc
