"""Shared fixtures: an isolated cache folder, a method's full arguments, and one tiny trained model for the session.

``make test-fast`` runs ``pytest -m "not slow"``: a test is marked ``slow`` (on itself, or a module's
``pytestmark`` when every test there is) when it trains, runs a pipeline or starts a subprocess that imports
the heavy stack; those run in ``make test`` only.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache as memo
from pathlib import Path
from typing import Any

import pytest
from tiny_world import OwnModel, build_own_model, free_port, train_overrides, write_pattern_folder

from potion.config.compose import compose_config, method_defaults

# One CPU thread for torch, here and in the commands the tests start (they copy os.environ), unless the caller says
# otherwise: the tests' tensors are tiny, and on a busy machine idle threads spinning for work cost several times
# the CPU time of the work itself (tests/test_ptn_decisive.py: 28 CPU-s with 2 threads, 3 with one).
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POTION_THREADS"):
    os.environ.setdefault(_name, "1")

# Fixtures that train a model or start a server: a test that uses one, directly or through another fixture, is slow.
HEAVY_FIXTURES = {"tiny_run", "own_model", "mlflow_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test that trains (through a fixture) without the ``slow`` mark: ``make test-fast`` would train."""
    unmarked = [item.nodeid for item in items if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"mark these tests slow (they use {', '.join(sorted(HEAVY_FIXTURES))}): "
                                + ", ".join(unmarked))


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$POTION_CACHE_DIR in this test's own folder (decoded data sets, importances, logits)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("POTION_CACHE_DIR", str(folder))
    return folder


@memo
def _method_block(name: str) -> dict[str, Any]:
    return method_defaults(name)


def full_method_args(name: str, **changes: Any) -> dict[str, Any]:
    """The keyword arguments ``method=<name>`` passes (conf/method/<name>.yaml and the schema), with changes."""
    return {**_method_block(name), **changes}


@pytest.fixture(scope="session")
def method_args() -> Callable[..., dict[str, Any]]:
    """``method_args("finetune", iterations=3)``: a method's full arguments as unlearn.py would pass them."""
    return full_method_args


@dataclass(frozen=True)
class TinyRun:
    """A poisoned small CNN trained once per session on the tiny pattern folder (tests/tiny_world.py)."""

    root: Path  # holds run/, cache/ and mlflow.db
    data: Path  # the tiny pattern folder (the session's ``tiny_data``)
    run: Path  # the training run folder (read it, never write into it)
    uri: str  # the sqlite MLflow store the training run is logged to
    summary: dict[str, Any]

    @property
    def cache(self) -> Path:
        return self.root / "cache"


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pattern image folder (tests/tiny_world.py), written once: read it, never write into it."""
    return write_pattern_folder(tmp_path_factory.mktemp("tiny_data") / "data")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> Iterator[TinyRun]:
    """The shared trained model (16 of 320 samples poisoned with a 3x3 patch; ~5 s on one core)."""
    from potion.pipelines.train import run_training

    root = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(root / "cache"))
        mp.setenv("POTION_THREADS", "1")
        data = tiny_data
        uri = f"sqlite:///{root / 'mlflow.db'}"
        summary = run_training(compose_config("train", train_overrides(data, root / "run",
                                                                       f"logger.tracking_uri={uri}")))
        yield TinyRun(root, data, root / "run", uri, summary)


@pytest.fixture()
def tiny(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> TinyRun:
    """The shared trained model, with this test using its cache folder (its decoded data and importances)."""
    monkeypatch.setenv("POTION_CACHE_DIR", str(tiny_run.cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    return tiny_run


@pytest.fixture(scope="session")
def own_model(tmp_path_factory: pytest.TempPathFactory) -> OwnModel:
    """A model trained outside the project on a folder with the poison in its files (potion.heal's input; ~2 s)."""
    return build_own_model(tmp_path_factory.mktemp("own_model"))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """``mlflow server`` on 127.0.0.1 with a temporary sqlite backend, started once: {"uri", "root"}."""
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "art")],
        cwd=root, stdout=subprocess.DEVNULL, stderr=open(root / "server.log", "w"),  # noqa: SIM115
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:  # not listening yet: fall through to the liveness / deadline check, then poll again
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield {"uri": uri, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
