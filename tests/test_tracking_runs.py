"""Runs left behind: RUNNING runs of killed processes are closed as KILLED, a finished folder that its store
lacks is logged when reused, a sweep's pending final run is replayed by ``python -m potion.relog``, and a
call to a server that hangs gives up within ``logger.timeout_s``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from potion.core.errors import ConfigError, TrackingError
from potion.core.io import read_json
from potion.tracking.liveness import HOST_TAG, PID_START_TAG, PID_TAG, process_tags
from potion.tracking.runs import (
    PENDING,
    FolderRun,
    ensure_logged,
    replay_command,
    write_pending,
)
from potion.tracking.tracker import MlflowTracker, RecordingTracker, start_tracker
from potion.tracking.uris import apply_timeout, http_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    for name in http_settings(1):  # each test sets its own
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def client(store: str) -> Any:
    start_tracker({"name": "mlflow", "tracking_uri": store}, experiment="potion").discard()  # creates the store
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _left_running(client: Any, experiment: str, **tags: str) -> str:
    """A RUNNING run as a process killed mid-run leaves it (created by the process ``tags`` name)."""
    exp = client.get_experiment_by_name(experiment) or client.get_experiment(client.create_experiment(experiment))
    return client.create_run(exp.experiment_id, tags={"potion.task": "train", **tags}).info.run_id


def _cfg(uri: str, experiment: str, **extra: Any) -> dict[str, Any]:
    return {"name": "mlflow", "tracking_uri": uri, "experiment": experiment, **extra}


def _folder(tmp_path: Path, run_id: str | None, config_hash: str = "h1") -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"clean_acc": 0.9, "asr": 0.1, "n_p": 16, "run_dir": str(run_dir),
                                                      "config_hash": config_hash, "mlflow_run_id": run_id}))
    (run_dir / "config.yaml").write_text("seed: 0\n")
    return run_dir


def _spec(experiment: str, config_hash: str = "h1") -> FolderRun:
    return FolderRun("train", experiment, "train-x", {"potion.task": "train", "potion.config_hash": config_hash},
                     {"seed": 0, "poison": {"count": 16}}, ("config.yaml", "summary.json"))


# --------------------------------------------------------------------------- runs left RUNNING


def test_a_new_run_closes_runs_left_running_by_dead_processes_of_this_host(store: str, client: Any) -> None:
    host = socket.gethostname()
    dead = _left_running(client, "closing", **{HOST_TAG: host, PID_TAG: str(_dead_pid())})
    alive = _left_running(client, "closing", **process_tags())  # this test's own process: still running
    reused_pid = _left_running(client, "closing", **{**process_tags(), PID_START_TAG: "1"})  # pid now someone else's
    elsewhere = _left_running(client, "closing", **{HOST_TAG: "another-host", PID_TAG: "1"})
    start_tracker(_cfg(store, "closing"), experiment="x").finish()
    status = {r: client.get_run(r).info.status for r in (dead, alive, reused_pid, elsewhere)}
    assert status == {dead: "KILLED", alive: "RUNNING", reused_pid: "KILLED", elsewhere: "RUNNING"}


def test_runs_carry_the_process_that_created_them(store: str, client: Any) -> None:
    tracker = start_tracker(_cfg(store, "tags"), experiment="x")
    tracker.finish()
    tags = client.get_run(tracker.run_id).data.tags
    assert tags[HOST_TAG] == socket.gethostname() and tags[PID_TAG] == str(os.getpid())


# --------------------------------------------------------------------------- reused finished folders


def test_a_finished_folder_whose_run_a_killed_process_left_running_is_closed_and_logged(
        tmp_path: Path, store: str, client: Any) -> None:
    old = _left_running(client, "reuse", **{HOST_TAG: socket.gethostname(), PID_TAG: str(_dead_pid())})
    run_dir = _folder(tmp_path, old)
    summary = ensure_logged(_cfg(store, "reuse"), run_dir, read_json(run_dir / "summary.json"), _spec("reuse"))
    new = summary["mlflow_run_id"]
    assert new != old and read_json(run_dir / "summary.json")["mlflow_run_id"] == new
    assert client.get_run(old).info.status == "KILLED"
    run = client.get_run(new)
    assert run.info.status == "FINISHED" and run.data.metrics["clean_acc"] == 0.9
    assert run.data.tags["potion.config_hash"] == "h1" and run.data.params["poison.count"] == "16"
    assert {a.path for a in client.list_artifacts(new)} == {"config.yaml", "summary.json"}
    again = ensure_logged(_cfg(store, "reuse"), run_dir, read_json(run_dir / "summary.json"), _spec("reuse"))
    assert again["mlflow_run_id"] == new  # logged once: a second reuse adds nothing
    exp = client.get_experiment_by_name("reuse").experiment_id
    assert len(client.search_runs([exp], "attributes.status = 'FINISHED'")) == 1


def test_a_folder_made_without_tracking_is_logged_when_reused_with_it(tmp_path: Path, store: str, client: Any) -> None:
    run_dir = _folder(tmp_path, None, config_hash="h2")
    summary = ensure_logged(_cfg(store, "untracked"), run_dir, read_json(run_dir / "summary.json"),
                            _spec("untracked", "h2"))
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_a_run_still_being_written_by_its_process_is_left_alone(tmp_path: Path, store: str, client: Any) -> None:
    busy = _left_running(client, "busy", **process_tags())
    run_dir = _folder(tmp_path, busy, config_hash="h3")
    summary = ensure_logged(_cfg(store, "busy"), run_dir, read_json(run_dir / "summary.json"), _spec("busy", "h3"))
    assert summary["mlflow_run_id"] == busy and client.get_run(busy).info.status == "RUNNING"


def test_a_reused_run_checks_its_logger_config(tmp_path: Path, store: str) -> None:
    run_dir = _folder(tmp_path, None)
    summary = read_json(run_dir / "summary.json")
    with pytest.raises(TrackingError, match="file store"):
        ensure_logged(_cfg("file:///tmp/mlruns", "e"), run_dir, summary, _spec("e"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(TrackingError, match="unreachable"):
        ensure_logged(_cfg(closed, "e"), run_dir, summary, _spec("e"))
    assert ensure_logged({"name": "none"}, run_dir, summary, _spec("e")) is summary


# --------------------------------------------------------------------------- a sweep's pending final run


@pytest.mark.slow  # two subprocesses that import MLflow
def test_relog_logs_a_pending_run_under_its_parent(tmp_path: Path, store: str, client: Any) -> None:
    parent = start_tracker(_cfg(store, "pending"), experiment="x", run_name="ptn-sweep")
    run_dir = _folder(tmp_path, None)
    recorder = RecordingTracker(None)
    recorder.set_tags({"potion.task": "unlearn", "potion.method": "potion"})
    recorder.log_params({"n_f": 3})
    recorder.log_metrics({"healed": 97.5})
    recorder.log_artifact(run_dir / "summary.json")
    recorder.finish("FINISHED")
    write_pending(run_dir, tracking_uri=store, experiment="pending", run_name="unlearn-potion",
                  parent_run_id=parent.run_id, calls=recorder.calls, status=recorder.status)
    assert replay_command(run_dir, store) == f"python -m potion.relog {run_dir} --tracking-uri {store}"
    proc = subprocess.run([sys.executable, "-m", "potion.relog", str(run_dir), "--tracking-uri", store], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    new = read_json(run_dir / "summary.json")["mlflow_run_id"]
    assert f"as MLflow run {new}" in proc.stdout and not (run_dir / PENDING).exists()
    run = client.get_run(new)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id and run.data.metrics["healed"] == 97.5
    assert run.info.status == "FINISHED" and run.data.params["n_f"] == "3"
    if shutil.which("git") and (ROOT / ".git").exists():  # MLflow's git tag: the checkout of the command's script
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        assert run.data.tags["mlflow.source.git.commit"] == head.stdout.strip()
    again = subprocess.run([sys.executable, "-m", "potion.relog", str(run_dir), "--tracking-uri", store], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.startswith("error: ") and again.stderr.count("\n") == 1
    assert "nothing there waits to be logged" in again.stderr


def _hostile_folder(tmp_path: Path, calls: list[Any], uri: str) -> Path:
    run_dir = _folder(tmp_path, None)
    write_pending(run_dir, tracking_uri=uri, experiment="hostile", run_name="r", parent_run_id=None, calls=[],
                  status="FINISHED")
    record = read_json(run_dir / PENDING)
    (run_dir / PENDING).write_text(json.dumps({**record, "calls": calls}))  # as someone else's folder may hold
    return run_dir


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink", "model", "relative"])
def test_relog_uploads_nothing_from_outside_the_run_folder(tmp_path: Path, store: str, client: Any,
                                                           where: str) -> None:
    from potion.tracking.runs import replay_pending

    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file")
    run_dir = tmp_path / "run"
    named = {"absolute": str(secret), "dotdot": str(run_dir / ".." / "secret.txt"),
             "symlink": str(run_dir / "link.txt"), "model": str(secret), "relative": "secret.txt"}[where]
    calls = [["metrics", [{"healed": 1.0}, None]], ["artifact", [named, None]]]
    if where == "model":
        calls[1] = ["model", {"name": "m", "spec": {}, "files": {"model.safetensors": named}}]
    run_dir = _hostile_folder(tmp_path, calls, store)
    (run_dir / "link.txt").symlink_to(secret)
    exp = client.get_experiment_by_name("hostile")
    before = len(client.search_runs([exp.experiment_id])) if exp else 0
    with pytest.raises(TrackingError, match="outside the run folder") as info:
        replay_pending(run_dir, store)
    assert "\n" not in str(info.value) and (run_dir / PENDING).is_file()
    exp = client.get_experiment_by_name("hostile")
    assert (len(client.search_runs([exp.experiment_id])) if exp else 0) == before  # no run, no upload


def test_relog_logs_into_the_users_store_not_the_one_the_record_names(
        tmp_path: Path, store: str, client: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from potion.relog import main

    theirs = tmp_path / "theirs" / "mlflow.db"
    run_dir = _hostile_folder(tmp_path, [["metrics", [{"healed": 2.0}, None]]], f"sqlite:///{theirs}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"was meant for sqlite:///{theirs}; logging to your store {store}" in out
    run_id = read_json(run_dir / "summary.json")["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["healed"] == 2.0
    assert not theirs.exists()  # the record's store was never opened


# --------------------------------------------------------------------------- bounded calls


def test_http_settings_keep_one_call_within_the_timeout() -> None:
    for timeout in (1, 2, 5, 9.5, 10, 30, 60, 600):
        s = http_settings(timeout)
        retries, per = int(s["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]), int(s["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        factor, jitter = int(s["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]), float(s["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
        sleeps = sum(factor * 2 ** (n - 1) if n > 1 else 0 for n in range(1, retries + 1)) + retries * jitter
        assert (retries + 1) * per + sleeps <= max(timeout, 1), timeout


@pytest.mark.parametrize("override", ["logger.timeout_s=0", "logger.timeout_s=abc", "logger.fallback=banana",
                                      "logger.system_metrics=yes", "logger.system_metrics_interval_s=0"])
def test_a_bad_logger_value_is_one_config_error_from_the_schema(override: str) -> None:
    from potion.config.compose import check_command_line

    with pytest.raises(ConfigError, match=override.split("=")[0]) as info:
        check_command_line("train", [override])
    assert "\n" not in str(info.value)


def test_a_call_to_a_server_that_stopped_answering_gives_up_in_bounded_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections but never answers (hung, or behind a dead proxy): without a bound,
    MLflow waits 120 s per attempt and retries 7 times."""
    from mlflow import MlflowClient

    for name in http_settings(2):  # restored after the test: other tests keep the default bound
        monkeypatch.setenv(name, "0")

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # connections complete in the backlog; nothing ever reads or answers them
    uri = f"http://127.0.0.1:{hung.getsockname()[1]}"
    try:
        apply_timeout(2)
        tracker = MlflowTracker(MlflowClient(tracking_uri=uri), "0" * 32, uri, "0")
        started = time.monotonic()
        worker = threading.Thread(target=lambda: [tracker.log_metrics({"acc": 1.0}) for _ in range(3)], daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), "a tracking call did not give up within 30 s"
        assert time.monotonic() - started < 15
        assert tracker.offline and tracker.failed  # later calls are skipped, not retried
    finally:
        hung.close()
