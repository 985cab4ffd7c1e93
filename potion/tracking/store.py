"""Opening a sqlite MLflow store safely when several processes start at once.

MLflow creates and migrates a new sqlite store with no lock: two commands started together both migrate, collide
(``table _alembic_tmp_metrics already exists``) and leave a half-migrated store that every later command fails on.
So every potion process opens a sqlite store holding ``<db>.lock`` (a ``filelock`` lock, which the OS releases
when its process dies) and, under that lock, repairs what an interrupted migration left (:func:`repair_store`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from filelock import FileLock, Timeout

from potion.core.errors import TrackingError
from potion.core.io import one_line

log = logging.getLogger(__name__)

LOCK_WAIT_S = 300.0  # creating a store takes seconds; a holder this slow has hung (or is stopped)
TMP_PREFIX = "_alembic_tmp_"  # alembic's batch migrations on sqlite copy a table into this name, then swap
MIGRATE_TIMEOUT_S = 600.0  # `mlflow db upgrade` of a store with runs


def lock_path(db: Path) -> Path:
    """The lock file of the sqlite store ``db``: ``<db>.lock`` in the same folder."""
    return db.with_name(db.name + ".lock")


@contextmanager
def store_lock(db: Path | None, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the inter-process lock of sqlite store ``db`` (nothing to lock for other stores: ``db`` None).

    Waits up to ``wait_s`` seconds for another process to finish creating or migrating the store, then
    raises one TrackingError line naming the lock file.
    """
    if db is None:
        yield
        return
    path = lock_path(db)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=wait_s, poll_interval=0.05)
    except Timeout as exc:
        raise TrackingError(f"another process has held the MLflow store lock {path} for over {wait_s:.0f} s "
                            "(a store migration that hung?); stop that process and run again") from exc
    except OSError as exc:
        raise TrackingError(f"cannot lock the MLflow store ({path}: {exc.strerror or exc}); make its folder "
                            "writable, or use a local folder for the sqlite store or an MLflow server "
                            "(logger.tracking_uri)") from exc
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------- what the database holds


@dataclass(frozen=True)
class StoreState:
    """What a look at the sqlite file shows: its tables, the migration's leftovers, revision and run count."""

    tables: frozenset[str]
    tmp_tables: tuple[str, ...]
    revision: str | None
    runs: int | None  # None: no runs table (a store whose creation stopped early)


def inspect_store(db: Path) -> StoreState | None:
    """The state of the sqlite store ``db``; None when there is no database yet (missing or empty file)."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    try:
        con = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise TrackingError(f"cannot read the MLflow store {db} ({exc})") from exc
    try:
        tables = frozenset(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        revision = _first(con, "SELECT version_num FROM alembic_version") if "alembic_version" in tables else None
        runs = _first(con, "SELECT COUNT(*) FROM runs") if "runs" in tables else None
    except sqlite3.DatabaseError as exc:
        raise TrackingError(f"the MLflow store {db} is not a readable sqlite database ({exc}); move it away or "
                            "choose another logger.tracking_uri") from exc
    finally:
        con.close()
    tmp = tuple(sorted(t for t in tables if t.startswith(TMP_PREFIX)))
    return StoreState(tables, tmp, None if revision is None else str(revision), None if runs is None else int(runs))


def _first(con: sqlite3.Connection, sql: str) -> object:
    row = con.execute(sql).fetchone()
    return None if row is None else row[0]


@cache
def schema_head() -> str | None:
    """The schema revision this MLflow migrates to, from its alembic scripts (None when they cannot be read)."""
    try:
        import mlflow
        from alembic.script import ScriptDirectory

        heads = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations")).get_heads()
    except Exception:  # noqa: BLE001 - only sharpens the diagnosis
        return None
    return str(heads[0]) if len(heads) == 1 else None


def is_half_migrated(state: StoreState | None) -> bool:
    """Whether a migration visibly stopped part-way: leftover temporary tables, or tables without a revision."""
    if state is None or not state.tables:
        return False
    return bool(state.tmp_tables) or ("experiments" in state.tables and state.revision is None)


def is_unfinished_and_empty(state: StoreState | None) -> bool:
    """Whether a store without runs stands at a schema revision other than this MLflow's (a migration that
    stopped between two revisions looks like this, and MLflow refuses to open it)."""
    if state is None or not state.tables or state.runs:
        return False
    head = schema_head()
    return head is not None and state.revision != head


# --------------------------------------------------------------------------- repair (under the lock)


def repair_store(db: Path) -> bool:
    """Bring a half-migrated store back before MLflow opens it (call with the store lock held); True if done.

    An empty one (no runs) is moved aside and MLflow creates a fresh store; in one with runs the temporary
    tables are dropped (only where the table they were copying still exists) and the migration runs again.
    """
    state = inspect_store(db)
    if not state or not state.runs:
        if is_half_migrated(state) or is_unfinished_and_empty(state):
            set_aside(db, "an interrupted schema migration")
            return True
        return False
    if not is_half_migrated(state):
        return False
    _drop_tmp_tables(db, state)
    _migrate(db)
    log.warning("repaired the MLflow store %s: dropped %s left by an interrupted schema migration and migrated "
                "it again", db, ", ".join(state.tmp_tables) or "nothing")
    return True


def set_aside(db: Path, why: str) -> Path:
    """Move an unusable store without runs to ``<db>.broken-<time>`` (kept, not deleted); return that path."""
    dst = db.with_name(f"{db.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    try:
        os.replace(db, dst)
    except OSError as exc:
        raise TrackingError(f"the MLflow store {db} was left unusable by {why} and cannot be moved aside "
                            f"({exc.strerror or exc}); move it away by hand") from exc
    for suffix in ("-journal", "-wal", "-shm"):  # sqlite's side files belong to the moved database
        side = db.with_name(db.name + suffix)
        if side.exists():
            os.replace(side, dst.with_name(dst.name + suffix))
    log.warning("the MLflow store %s held no runs and was left unusable by %s: moved it to %s and created a "
                "new one", db, why, dst)
    return dst


def _drop_tmp_tables(db: Path, state: StoreState) -> None:
    lost = [t for t in state.tmp_tables if t[len(TMP_PREFIX):] not in state.tables]
    if lost:
        raise TrackingError(
            f"the MLflow store {db} was left half-migrated with its runs inside: table(s) "
            f"{', '.join(t[len(TMP_PREFIX):] for t in lost)} exist only as {', '.join(lost)}; restore a backup, "
            "or move the file away to start a new store")
    con = sqlite3.connect(db, timeout=30)
    try:
        for table in state.tmp_tables:
            con.execute(f'DROP TABLE IF EXISTS "{table}"')
        con.commit()
    except sqlite3.Error as exc:
        raise TrackingError(f"cannot repair the half-migrated MLflow store {db} ({exc})") from exc
    finally:
        con.close()


def _migrate(db: Path) -> None:
    """Run MLflow's schema migration on the store (``mlflow db upgrade``, in a child process)."""
    cmd = [sys.executable, "-m", "mlflow", "db", "upgrade", "sqlite:///" + db.as_posix()]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S, check=False)
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        failure = None if proc.returncode == 0 else lines[-1]
    except (OSError, subprocess.TimeoutExpired) as exc:
        failure = one_line(exc)
    if failure is not None:
        raise TrackingError(
            f"the MLflow store {db} was left half-migrated with its runs inside and migrating it again failed "
            f"({failure[:300]}); restore a backup, or move the file away to start a new store")
