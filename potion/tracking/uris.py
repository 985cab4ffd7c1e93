"""Where a run is tracked and how long a call there may try: the ``logger`` config made explicit.

The default store is a sqlite file in the working folder, and ``file:`` stores (deprecated in MLflow) are refused.
A call's time limit is MLflow's own HTTP settings, set from ``logger.timeout_s``: MLflow's defaults retry for
minutes against a dead server. Nothing here imports MLflow.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potion.core.errors import TrackingError
from potion.core.io import one_line

DEFAULT_TIMEOUT_S = 60.0  # logger.timeout_s when a config has none: how long one call to a server may try
DEFAULT_SYSTEM_METRICS_INTERVAL_S = 10.0  # logger.system_metrics_interval_s when a config has none
SQLITE = "sqlite:///"


def resolve_tracking_uri(uri: str | None) -> str:
    """Make a tracking URI explicit and absolute, so every process logs to the same store.

    None or "" becomes ``sqlite:///<cwd>/mlflow.db``; a relative sqlite path is made absolute against
    the working folder; http(s) and other server URIs pass unchanged; ``file:`` stores and bare paths
    (which MLflow reads as the deprecated file store) raise TrackingError.
    """
    uri = (uri or "").strip()
    if not uri:
        return sqlite_uri(Path.cwd() / "mlflow.db")
    if uri.startswith(SQLITE):
        path = uri[len(SQLITE):]
        if not path or path.startswith(":memory:"):
            raise TrackingError(f"tracking URI {uri!r} names no database file; use e.g. sqlite:///mlflow.db")
        return sqlite_uri(Path(path).expanduser().absolute())
    if uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks")):
        raise TrackingError(
            f"tracking URI {uri!r} is a file store, which current MLflow no longer supports; "
            "use an embedded store such as sqlite:///mlflow.db or a server URI http://host:port"
        )
    return uri


def sqlite_uri(path: Path) -> str:
    """The URI of a sqlite store file; an absolute path gives the four-slash form ``sqlite:////abs/db``."""
    return SQLITE + path.as_posix()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite tracking URI, None for any other URI."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def is_http(uri: str | None) -> bool:
    """Whether the URI points at a tracking server (which can be down) rather than an embedded store."""
    return str(uri or "").startswith(("http://", "https://"))


def check_sqlite_folder(db: Path) -> None:
    """Create the folder of a sqlite store; one line when it cannot be created or written."""
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(f"cannot create the folder of the MLflow store {db} ({one_line(exc)})") from exc
    if not os.access(db.parent, os.W_OK):
        raise TrackingError(f"the folder of the MLflow store {db} is not writable; choose another logger.tracking_uri")


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
    """The ``logger`` config as settings, None for ``logger=none`` (or no config).

    Its values were checked once, by the schema (:mod:`potion.config.schema`), before the command started; only
    the tracking URI is made explicit here (a file store is one TrackingError line). Used before a run starts and
    also when a finished run is reused.
    """
    if not tracking_enabled(logger_cfg):
        return None
    cfg = dict(logger_cfg or {})
    timeout = cfg.get("timeout_s", DEFAULT_TIMEOUT_S)
    experiment = cfg.get("experiment")
    return LoggerSettings(resolve_tracking_uri(cfg.get("tracking_uri")), str(cfg.get("fallback") or "none"),
                          str(experiment) if experiment not in (None, "") else None,
                          None if timeout is None else float(timeout), bool(cfg.get("system_metrics", False)),
                          float(cfg.get("system_metrics_interval_s") or DEFAULT_SYSTEM_METRICS_INTERVAL_S))


def tracking_enabled(logger_cfg: Mapping[str, Any] | None) -> bool:
    """Whether the ``logger`` config asks for tracking at all (``logger=none`` does not)."""
    name = str((logger_cfg or {}).get("name") or "none").lower()
    return name not in ("none", "null", "off")


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
