"""Opening a store: an ``MlflowClient`` whose store is ready and reachable, or one ``TrackingError`` line.

A server call that got no answer at all (refused, timed out, server errors after MLflow's retries) means the server
is down. ``mlflow`` is imported on first use because it is slow to import.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

from potion.core.errors import TrackingError
from potion.core.io import one_line
from potion.tracking.store import repair_store, store_lock
from potion.tracking.uris import (
    DEFAULT_TIMEOUT_S,
    LoggerSettings,
    apply_timeout,
    check_sqlite_folder,
    http_settings,
    is_http,
    resolve_tracking_uri,
    sqlite_path,
)

log = logging.getLogger(__name__)


def import_mlflow() -> Any:
    """Import mlflow on first use (it is slow) and quieten its info chatter and internal deprecation notices."""
    for key, value in http_settings(DEFAULT_TIMEOUT_S).items():  # bounded calls also where no logger config is read
        os.environ.setdefault(key, value)
    import mlflow

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow's own use of deprecated SQLAlchemy/library APIs is nothing our users can act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow(\.|$)")
    return mlflow


def no_answer(exc: BaseException) -> bool:
    """Whether a failed MLflow call got no answer from its server: refused, timed out, or server errors after
    MLflow's retries (a requests error somewhere in the exception's chain), not an error the server sent back."""
    import requests

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.RequestException | ConnectionError | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def unreachable(uri: str, reason: str) -> TrackingError:
    """The one line for a server that does not answer, naming every way on."""
    return TrackingError(
        f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
        "--port N --backend-store-uri sqlite:///mlflow.db), fix logger.tracking_uri, set logger.fallback=local "
        "to log to the local sqlite store instead, or logger=none")


def check_reachable(uri: str) -> None:
    """Fail in one line when a store cannot be used: a server that does not answer (asked through MLflow, within
    its HTTP settings), or a sqlite store whose folder cannot be written. Other schemes are left to MLflow."""
    if is_http(uri):
        try:
            import_mlflow().MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except Exception as exc:  # an error the server sent back (auth, ...) means it is there: MLflow reports it
            if no_answer(exc):
                raise unreachable(uri, one_line(exc)) from exc
        return
    db = sqlite_path(uri)
    if db is not None:
        check_sqlite_folder(db)


def usable_uri(settings: LoggerSettings) -> str:
    """The store to log to: the configured one when it answers, else (fallback=local) the local sqlite store.

    Also sets the HTTP timeout of this process's MLflow calls (``logger.timeout_s``).
    """
    apply_timeout(settings.timeout_s)
    uri = settings.tracking_uri
    try:
        check_reachable(uri)
        return uri
    except TrackingError:
        if settings.fallback != "local" or not is_http(uri):
            raise
    local = resolve_tracking_uri(None)
    log.warning("MLflow tracking server %s is unreachable; falling back to the local sqlite store %s", uri, local)
    check_reachable(local)
    return local


def open_client(uri: str, experiment: str | None = None) -> tuple[Any, str | None]:
    """An MlflowClient for ``uri`` with its store ready, and the id of ``experiment`` (created if missing).

    A sqlite store is created, migrated or repaired while this process holds the store's lock, so processes
    opening a new store at once do not race MLflow's migration. Failures raise one line.
    """
    db = sqlite_path(uri)
    with store_lock(db):
        if db is not None:
            repair_store(db)
        try:
            client = import_mlflow().MlflowClient(tracking_uri=uri)
            if experiment is None:
                client.search_experiments(max_results=1)  # builds (creates, migrates) the store now, under the lock
                return client, None
            return client, _ensure_experiment(client, experiment, uri)
        except TrackingError:
            raise
        except Exception as exc:  # a corrupt or foreign database, a refused connection, ...
            raise TrackingError(f"cannot open the MLflow store {uri} ({one_line(exc)}); fix "
                                "logger.tracking_uri or use logger=none") from exc


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


def connect(tracking_uri: str | None) -> tuple[Any, str]:
    """A client of an existing run's store, checked reachable first (a clear line for a dead server or a bad
    URI), and the store's resolved URI."""
    uri = resolve_tracking_uri(tracking_uri)
    check_reachable(uri)
    return open_client(uri)[0], uri


def download_run_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dst: str | os.PathLike) -> Path:
    """Fetch ``artifact_path`` of a finished run (``mlflow:<run id>`` inputs) into ``dst``; return the local path."""
    client, uri = connect(tracking_uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # unknown id, malformed id and store errors read the same
        raise TrackingError(f"unknown MLflow run id {run_id!r} in {uri} ({one_line(exc)})") from exc
    Path(dst).mkdir(parents=True, exist_ok=True)
    try:
        return Path(client.download_artifacts(run_id, artifact_path, os.fspath(dst)))
    except Exception as exc:
        raise TrackingError(
            f"cannot download artifact {artifact_path!r} of MLflow run {run_id} from {uri} ({one_line(exc)})"
        ) from exc
