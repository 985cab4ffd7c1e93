"""Tracking: explicit URIs, fast failure on a dead server, guarded logging, round trips through MLflow."""

from __future__ import annotations

import functools
import logging
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from potion.core.errors import TrackingError
from potion.tracking.client import check_reachable, download_run_artifacts
from potion.tracking.params import MAX_PARAM_VALUE, flatten_params, sanitize_key
from potion.tracking.tracker import PARENT_TAG, MlflowTracker, NullTracker, start_tracker
from potion.tracking.uris import resolve_tracking_uri


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Talk to 127.0.0.1 directly, whatever proxy the environment sets."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite store for the module: creating its tables takes seconds."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture(scope="module")
def store_uri(store: Path) -> str:
    return f"sqlite:///{store}/mlflow.db"


@pytest.fixture(scope="module")
def client(store_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=store_uri)


def _mlflow_cfg(uri: str, **extra: str) -> dict[str, str]:
    return {"name": "mlflow", "tracking_uri": uri, **extra}


def _closed_port_uri() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- URIs


def test_default_uri_is_sqlite_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_tracking_uri("") == resolve_tracking_uri(None)


def test_relative_sqlite_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path}/sub/x.db"
    assert resolve_tracking_uri(f"sqlite:///{tmp_path}/x.db") == f"sqlite:///{tmp_path}/x.db"


def test_server_uris_pass_unchanged() -> None:
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"
    assert resolve_tracking_uri("https://mlflow.example.org/prefix") == "https://mlflow.example.org/prefix"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "file:mlruns", "./mlruns", "sqlite:///"])
def test_file_store_and_empty_sqlite_are_refused(uri: str) -> None:
    with pytest.raises(TrackingError, match="sqlite:///"):
        resolve_tracking_uri(uri)


def test_sqlite_folder_is_created(tmp_path: Path) -> None:
    check_reachable(f"sqlite:///{tmp_path}/a/b/mlflow.db")
    assert (tmp_path / "a" / "b").is_dir()


def test_import_is_cheap() -> None:
    code = ("import sys, potion.tracking.tracker, potion.tracking.runs; "
            "assert 'mlflow' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# --------------------------------------------------------------------------- params


def test_flatten_params_nested_lists_long_and_odd_keys() -> None:
    cfg = {
        "model": {"name": "resnet9", "widths": [64, 128], "opt": {"lr": 0.1, "nesterov": True}},
        "poison": {"indices": list(range(3000))},
        "note": "x" * 10_000,
        "empty": {},
        "none": None,
        "bad key!@": 1,
    }
    flat = flatten_params(cfg)
    assert flat["model.name"] == "resnet9"
    assert flat["model.widths"] == "[64, 128]"
    assert flat["model.opt.lr"] == "0.1"
    assert flat["model.opt.nesterov"] == "True"
    assert flat["empty"] == "{}"
    assert flat["none"] == "None"
    assert flat["bad key__"] == "1"
    assert len(flat["note"]) == MAX_PARAM_VALUE
    assert len(flat["poison.indices"]) == MAX_PARAM_VALUE
    assert flat["poison.indices"].startswith("[0, 1, 2")
    assert all(isinstance(v, str) for v in flat.values())


def test_flatten_params_prefix() -> None:
    assert flatten_params({"a": {"b": 1}}, prefix="cfg") == {"cfg.a.b": "1"}


@pytest.mark.parametrize(
    ("key", "expected"),
    [("a/b", "a/b"), ("/a//b/", "a/b"), ("a/./b", "a/b"), ("a/../b", "a/__/b"), ("", "_"), ("x:y=z", "x_y_z")],
)
def test_sanitize_key(key: str, expected: str) -> None:
    assert sanitize_key(key) == expected


# --------------------------------------------------------------------------- trackers


def test_logger_none_and_missing_config_give_null_tracker() -> None:
    for cfg in ({"name": "none"}, None, {"name": None}):
        tracker = start_tracker(cfg, experiment="e")
        assert isinstance(tracker, NullTracker)
        assert tracker.run_id is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, step=1)
        tracker.log_artifact("missing.txt")
        tracker.set_tags({"t": "v"})
        assert isinstance(tracker.child("c"), NullTracker)
        tracker.finish()


def test_file_uri_in_config_raises() -> None:
    with pytest.raises(TrackingError, match="file store"):
        start_tracker(_mlflow_cfg("file:///tmp/mlruns"), experiment="e")


def test_round_trip(store: Path, store_uri: str, client, tmp_path: Path) -> None:
    cfg = {"model": {"name": "resnet9", "widths": [64, 128]}, "seed": 0}
    tracker = start_tracker(_mlflow_cfg(store_uri), experiment="round trip", run_name="train", tags={"stage": "train"})
    assert isinstance(tracker, MlflowTracker)
    assert tracker.tracking_uri == store_uri
    assert tracker.experiment_id is not None
    tracker.log_params(cfg)
    for epoch in range(3):
        tracker.log_metrics(
            {"train/loss": torch.tensor(1.0 / (epoch + 1)), "lr": np.float32(0.1), "skip": None}, step=epoch
        )
    tracker.log_metrics({"test/acc": 0.93, "asr": float("nan")})
    artifact = tmp_path / "summary.json"
    artifact.write_text('{"ok": true}')
    tracker.log_artifact(artifact, "reports")
    tracker.set_tags({"method": "potion", "share": 0.1})
    tracker.finish()
    tracker.finish()  # a second finish is harmless

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train"
    assert run.data.params == {"model.name": "resnet9", "model.widths": "[64, 128]", "seed": "0"}
    assert run.data.tags["stage"] == "train"
    assert run.data.tags["method"] == "potion"
    assert run.data.tags["share"] == "0.1"
    assert "skip" not in run.data.metrics
    assert run.data.metrics["test/acc"] == pytest.approx(0.93)
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, round(m.value, 4)) for m in sorted(history, key=lambda m: m.step)] == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.3333),
    ]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "reports")] == ["reports/summary.json"]
    assert Path(store) in Path(run.info.artifact_uri.removeprefix("file://")).parents


def test_artifacts_download(store_uri: str, tmp_path: Path) -> None:
    with start_tracker(_mlflow_cfg(store_uri), experiment="downloads") as tracker:
        folder = tmp_path / "weights"
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"\x00\x01")
        tracker.log_artifact(folder)
    got = download_run_artifacts(store_uri, tracker.run_id, "weights", tmp_path / "dst")
    assert (got / "model.pt").read_bytes() == b"\x00\x01"
    with pytest.raises(TrackingError, match="unknown MLflow run id"):
        download_run_artifacts(store_uri, "0" * 32, "weights", tmp_path / "dst2")
    with pytest.raises(TrackingError, match="cannot download"):
        download_run_artifacts(store_uri, tracker.run_id, "no/such/path", tmp_path / "dst3")


def test_context_manager_marks_failure(store_uri: str, client) -> None:
    with pytest.raises(RuntimeError), start_tracker(_mlflow_cfg(store_uri), experiment="round trip") as tracker:
        raise RuntimeError("boom")
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_parent_and_child(store_uri: str, client) -> None:
    cfg = _mlflow_cfg(store_uri, experiment="sweep")
    parent = start_tracker(cfg, experiment="ignored", run_name="grid")
    child = start_tracker(cfg, experiment="ignored", run_name="point", parent_run_id=parent.run_id)
    child.log_metrics({"acc": 0.5})
    child.finish()
    parent.finish()
    assert parent.experiment_id == child.experiment_id == client.get_experiment_by_name("sweep").experiment_id
    assert client.get_run(child.run_id).data.tags[PARENT_TAG] == parent.run_id
    assert PARENT_TAG not in client.get_run(parent.run_id).data.tags


def test_child_runs_share_the_parents_client_and_experiment(store_uri: str, client) -> None:
    parent = start_tracker(_mlflow_cfg(store_uri, experiment="nested"), experiment="ignored", run_name="sweep")
    child = parent.child("candidate-k3", tags={"potion.ptn_step": 3})
    child.log_metrics({"forget_acc": 0.25})
    child.finish()
    parent.finish()
    run = client.get_run(child.run_id)
    assert run.data.tags[PARENT_TAG] == parent.run_id and run.data.tags["potion.ptn_step"] == "3"
    assert run.info.experiment_id == parent.experiment_id and run.info.run_name == "candidate-k3"
    assert run.data.metrics["forget_acc"] == 0.25 and run.info.status == "FINISHED"


def test_experiment_created_by_someone_else_first(store_uri: str, client, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    real_get = MlflowClient.get_experiment_by_name
    calls = {"n": 0}

    def racy_get(self, name):  # first look misses, as if a parallel process created it just after
        calls["n"] += 1
        if calls["n"] == 1:
            client.create_experiment(name)
            return None
        return real_get(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", racy_get)
    tracker = start_tracker(_mlflow_cfg(store_uri), experiment="raced")
    tracker.finish()
    assert tracker.experiment_id == real_get(client, "raced").experiment_id


def test_deleted_experiment_is_a_clear_error(store_uri: str, client) -> None:
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(TrackingError, match="restore"):
        start_tracker(_mlflow_cfg(store_uri), experiment="gone")


def test_failing_calls_after_start_do_not_raise(
    store_uri: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = start_tracker(_mlflow_cfg(store_uri), experiment="flaky")

    def broken(*args, **kwargs):
        raise ConnectionError("store went away")

    monkeypatch.setattr(tracker._client, "log_batch", broken)
    monkeypatch.setattr(tracker._client, "log_artifact", broken)
    monkeypatch.setattr(tracker._client, "set_terminated", broken)
    with caplog.at_level(logging.WARNING, logger="potion.tracking.tracker"):
        for step in range(5):
            tracker.log_metrics({"loss": 1.0}, step=step)
        tracker.log_params({"a": 1})
        tracker.set_tags({"t": "v"})
        tracker.log_artifact(__file__)
        tracker.log_metrics({"bad": torch.ones(3)})
        tracker.finish()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("log_metrics failed" in m for m in messages) == 1  # once per kind, not a flood
    assert any("finish failed" in m for m in messages)
    assert any("'bad' skipped" in m for m in messages)


class _Answered(Exception):
    """An error a server sent back (what MLflow raises for a REST error response)."""


def test_a_call_no_server_answered_switches_tracking_off_and_an_answered_error_does_not() -> None:
    import requests

    class Client:
        def __init__(self, error: Exception) -> None:
            self.error, self.calls = error, 0

        def log_batch(self, *args: object, **kwargs: object) -> None:
            self.calls += 1
            raise self.error

    gone = Client(RuntimeError("API request failed"))
    gone.error.__context__ = requests.exceptions.ConnectionError("Max retries exceeded")  # as MLflow raises it
    answered = Client(_Answered("RESOURCE_DOES_NOT_EXIST"))
    for client in (gone, answered):
        tracker = MlflowTracker(client, "0" * 32, _closed_port_uri(), "0")
        tracker.log_metrics({"loss": 1.0})
        tracker.log_metrics({"loss": 2.0})
        assert tracker.failed
    assert gone.calls == 1 and answered.calls == 2  # no answer: tracking off; an answered error: it goes on


# --------------------------------------------------------------------------- unreachable server


def test_closed_port_fails_fast_with_one_clear_line() -> None:
    uri = _closed_port_uri()
    started = time.monotonic()
    with pytest.raises(TrackingError) as info:
        start_tracker(_mlflow_cfg(uri), experiment="e")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert uri in message and "fallback" in message and "logger=none" in message
    assert "\n" not in message


def test_closed_port_with_local_fallback(
    store: Path, store_uri: str, client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(store)  # the default local store is then the module's store
    with caplog.at_level(logging.WARNING, logger="potion.tracking"):
        tracker = start_tracker(_mlflow_cfg(_closed_port_uri(), fallback="local"), experiment="fallback")
    assert tracker.tracking_uri == store_uri
    assert any(
        "falling back to the local sqlite store" in r.getMessage() and store_uri in r.getMessage()
        for r in caplog.records
    )
    tracker.log_metrics({"acc": 1.0})
    tracker.finish()
    assert client.get_run(tracker.run_id).data.metrics["acc"] == 1.0


def test_a_server_that_answers_passes_the_check(tmp_path: Path) -> None:
    """A live server (here a static stub that answers MLflow's request with an error) passes the check."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()


def test_recorded_calls_replay_into_a_run_after_a_trip_through_pickle(store_uri: str, client,
                                                                       tmp_path: Path) -> None:
    import pickle

    from potion.tracking.tracker import RecordingTracker

    artifact = tmp_path / "summary.json"
    artifact.write_text("{}")
    recorder = RecordingTracker("placeholder-id")
    recorder.set_tags({"potion.task": "unlearn"})
    recorder.log_params({"method": {"name": "potion", "ptn": {"rho": 0.1}}})
    recorder.log_metrics({"healed": 93.5, "skipped": None})
    recorder.log_metrics({"ptn_traj_forget_acc": 0.5}, step=3)
    recorder.log_artifact(artifact)
    recorder.finish("FINISHED")
    calls = pickle.loads(pickle.dumps(recorder.calls))  # what a job returns to the sweeper's process
    run = start_tracker(_mlflow_cfg(store_uri, experiment="replay"), experiment="ignored", run_name="final")
    RecordingTracker.replay(calls, run)
    run.finish(recorder.status or "FAILED")
    got = client.get_run(run.run_id)
    assert got.data.tags["potion.task"] == "unlearn" and got.data.params["method.ptn.rho"] == "0.1"
    assert got.data.metrics["healed"] == 93.5 and "skipped" not in got.data.metrics
    assert [m.step for m in client.get_metric_history(run.run_id, "ptn_traj_forget_acc")] == [3]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["run.log", "summary.json"]  # run.log: its log
    assert got.info.status == "FINISHED"


def test_a_discarded_placeholder_run_is_deleted(store_uri: str, client) -> None:
    parent = start_tracker(_mlflow_cfg(store_uri, experiment="discard"), experiment="ignored", run_name="sweep")
    child = parent.child("final")
    child.discard()
    assert client.get_run(child.run_id).info.lifecycle_stage == "deleted"


def test_no_private_api_of_mlflow_hydra_or_joblib() -> None:
    """Underscore names of these packages change without notice: imported, or read off a name imported from them."""
    import ast

    root = Path(__file__).resolve().parents[1]
    found = []
    for path in [*root.glob("potion/**/*.py"), *root.glob("hydra_plugins/**/*.py"), *root.glob("*.py")]:
        tree = ast.parse(path.read_text())
        theirs: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("mlflow", "hydra", "joblib"):
                theirs.update(a.asname or a.name for a in node.names)
                private = [a.name for a in node.names if a.name.startswith("_")]
                if private or any(p.startswith("_") for p in str(node.module).split(".")):
                    found.append(f"{path.name}:{node.lineno} from {node.module} import {private}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in theirs):
                found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert found == []
