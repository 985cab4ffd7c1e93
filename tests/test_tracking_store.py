"""A sqlite MLflow store opened by several processes at once, and stores an interrupted migration left behind."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from potion.core.errors import TrackingError
from potion.tracking.client import open_client
from potion.tracking.store import TMP_PREFIX, inspect_store, is_half_migrated, lock_path, store_lock
from potion.tracking.tracker import start_tracker

ROOT = Path(__file__).resolve().parents[1]


def _open_and_log(uri: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue) -> None:
    """One process: wait for the others, then start a run on the (new) store, as a command would."""
    import logging

    logging.disable(logging.WARNING)
    barrier.wait()
    try:
        tracker = start_tracker({"name": "mlflow", "tracking_uri": uri}, experiment="potion", run_name="p")
        tracker.log_metrics({"acc": 1.0})
        tracker.finish()
        out.put(("ok", tracker.run_id))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def _table_names(db: Path) -> set[str]:
    con = sqlite3.connect(db)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


@pytest.fixture(scope="module")
def ready_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated store with one finished run (copied by the repair tests; creating one costs seconds)."""
    db = tmp_path_factory.mktemp("ready") / "mlflow.db"
    tracker = start_tracker({"name": "mlflow", "tracking_uri": f"sqlite:///{db}"}, experiment="potion")
    tracker.log_metrics({"acc": 0.5})
    tracker.finish()
    return db


@pytest.mark.slow  # eight processes open one store (~10-30 s on 2 cores)
def test_eight_processes_starting_at_once_on_a_new_store_all_succeed(tmp_path: Path) -> None:
    import mlflow  # noqa: F401 - imported once here, so the forked processes reach the store together

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    ctx = multiprocessing.get_context("fork")
    n = 8
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_and_log, args=(uri, barrier, out)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r for r in results if r[0] != "ok"] == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("potion").experiment_id])
    assert len(runs) == n and all(r.info.status == "FINISHED" for r in runs)
    assert not [t for t in _table_names(tmp_path / "new.db") if t.startswith(TMP_PREFIX)]


def test_the_store_lock_is_exclusive_and_waits_boundedly(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    code = ("import sys, time; from pathlib import Path; from potion.tracking.store import store_lock\n"
            "with store_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(30)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(db)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(TrackingError, match="held the MLflow store lock") as info, store_lock(db, wait_s=0.5):
            pass
        assert time.monotonic() - started < 5 and "\n" not in str(info.value)
        assert str(lock_path(db)) in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    with store_lock(db, wait_s=5):  # the OS released the dead holder's lock
        pass


@pytest.mark.slow  # a migrated store copied and opened (seconds)
def test_a_half_migrated_store_without_runs_is_set_aside_and_recreated(tmp_path: Path, ready_store: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(ready_store, db)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM runs")  # nothing of value in it, as in a store two first commands broke
    con.execute(f"CREATE TABLE {TMP_PREFIX}latest_metrics AS SELECT * FROM latest_metrics")
    con.commit()
    con.close()
    assert is_half_migrated(inspect_store(db))
    tracker = start_tracker({"name": "mlflow", "tracking_uri": f"sqlite:///{db}"}, experiment="potion")
    tracker.finish()
    assert not [t for t in _table_names(db) if t.startswith(TMP_PREFIX)]
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1  # kept, not deleted


@pytest.mark.slow  # a migrated store copied and opened (seconds)
def test_a_half_migrated_store_with_runs_is_repaired_in_place(tmp_path: Path, ready_store: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(ready_store, db)
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE {TMP_PREFIX}latest_metrics AS SELECT * FROM latest_metrics")
    con.commit()
    con.close()
    client, experiment_id = open_client(f"sqlite:///{db}", "potion")
    assert len(client.search_runs([experiment_id])) == 1  # the earlier run is still there
    assert not [t for t in _table_names(db) if t.startswith(TMP_PREFIX)]
    assert not list(tmp_path.glob("mlflow.db.broken-*"))


@pytest.mark.slow  # a migrated store copied and opened (seconds)
def test_a_half_migrated_store_that_lost_a_table_is_explained_in_one_line(tmp_path: Path, ready_store: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(ready_store, db)
    con = sqlite3.connect(db)
    con.execute(f"ALTER TABLE latest_metrics RENAME TO {TMP_PREFIX}latest_metrics")  # killed between drop and rename
    con.commit()
    con.close()
    with pytest.raises(TrackingError, match="half-migrated") as info:
        open_client(f"sqlite:///{db}", "potion")
    assert "latest_metrics" in str(info.value) and "\n" not in str(info.value)
    assert f"{TMP_PREFIX}latest_metrics" in _table_names(db)  # nothing dropped: the data is in there


def test_a_file_that_is_no_database_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(TrackingError) as info:
        open_client(f"sqlite:///{db}")
    assert "\n" not in str(info.value) and str(db) in str(info.value)


@pytest.mark.slow  # a migrated store copied and opened (seconds)
def test_an_empty_store_at_another_revision_is_set_aside_when_mlflow_cannot_open_it(tmp_path: Path,
                                                                                      ready_store: Path) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copy(ready_store, db)
    con = sqlite3.connect(db)
    con.execute("DELETE FROM runs")
    con.execute("UPDATE alembic_version SET version_num = '4465047574b1'")  # stopped between two revisions
    con.commit()
    con.close()
    client, experiment_id = open_client(f"sqlite:///{db}", "potion")
    assert client.search_runs([experiment_id]) == []
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1
