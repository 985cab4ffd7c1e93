"""A tracking server killed mid-sweep: the sweep still writes its final run folder, gives up on the server
within ``logger.timeout_s`` instead of minutes, says how to log the final run later, and that command logs
it once the server is back (closing the sweep's parent run, left RUNNING, as KILLED)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TinyRun
from tiny_world import QUICK_PTN, free_port

from potion.core.io import read_json

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # a real server started twice and a sweep in a subprocess (~2 min on 2 cores)

PTN = QUICK_PTN


def _start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over root/server.db, once /health answers."""
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "a"),  # noqa: SIM115
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill(proc)
            pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-2000:])
        time.sleep(0.5)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the server and its workers (its own process group), as a crash would."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def lost(tmp_path_factory: pytest.TempPathFactory, tiny_run: TinyRun) -> Iterator[dict]:
    """Start a server, sweep the session's tiny model against it (with an empty cache of its own, so the sweep
    computes its importances) and kill the server once the prepare job is done."""
    root = tmp_path_factory.mktemp("lost")
    env = {**os.environ, "POTION_CACHE_DIR": str(root / "cache"), "POTION_THREADS": "1"}
    for key in [k for k in env if k.lower().endswith("_proxy")]:
        env.pop(key)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(root, port)
    cmd = [sys.executable, "sweep.py", f"train_run={tiny_run.run}", *PTN, f"logger.tracking_uri={uri}",
           "logger.experiment=lost", "logger.timeout_s=5", "hydra.sweeper.batch_size=4",
           f"hydra.sweep.dir={root / 'sweep'}", f"out_dir={root / 'final'}"]
    started = time.monotonic()
    sweep = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(sweep.stderr), daemon=True)
    reader.start()
    out = []
    try:
        for line in sweep.stdout:
            out.append(line)
            if line.startswith("PTN sweep: importances") and server.poll() is None:
                _kill(server)  # the parent run exists, the rounds and the final job are still to come
        sweep.wait(timeout=600)
        reader.join(timeout=30)
    finally:
        if sweep.poll() is None:
            sweep.kill()
        _kill(server)
    yield {"root": root, "uri": uri, "port": port, "rc": sweep.returncode, "stdout": "".join(out),
           "stderr": "".join(err), "seconds": time.monotonic() - started, "final": root / "final"}


def test_the_sweep_writes_its_final_run_folder_without_the_server(lost: dict) -> None:
    text = lost["stdout"] + lost["stderr"]
    assert "PTN sweep: importances" in lost["stdout"], text[-3000:]
    assert lost["rc"] == 0, text[-3000:]
    summary = read_json(lost["final"] / "summary.json")
    assert summary["method"] == "potion" and summary["healed"] is not None
    assert (lost["root"] / "sweep" / "ptn_sweep.json").is_file()
    assert (lost["final"] / "mlflow_pending.json").is_file()
    assert f"python -m potion.relog {lost['final']} --tracking-uri {lost['uri']}" in lost["stderr"]
    assert "Traceback" not in text


def test_the_sweep_gives_up_on_the_dead_server_quickly(lost: dict) -> None:
    """With MLflow's own retries the first call after the kill alone waited ~5 minutes."""
    assert lost["seconds"] < 240, lost["seconds"]


def test_the_final_run_is_logged_once_the_server_is_back(lost: dict, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    from potion.relog import main as relog
    from potion.tracking.uris import http_settings

    for name in http_settings(60):  # relog sets MLflow's HTTP settings for its process: restored after the test
        monkeypatch.delenv(name, raising=False)
    server = _start_server(lost["root"], lost["port"])
    try:
        assert relog([str(lost["final"]), "--tracking-uri", lost["uri"]]) == 0  # the printed command, in process
        assert "logged " in capsys.readouterr().out
        client = MlflowClient(tracking_uri=lost["uri"])
        run_id = read_json(lost["final"] / "summary.json")["mlflow_run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["potion.task"] == "unlearn"
        assert run.data.metrics["healed"] == pytest.approx(read_json(lost["final"] / "summary.json")["healed"])
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["potion.task"] == "ptn_sweep"
        assert parent.info.status == "KILLED"  # left RUNNING when the server died; its process is gone
        assert not (lost["final"] / "mlflow_pending.json").exists()
    finally:
        _kill(server)
