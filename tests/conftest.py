"""Shared fixtures: an isolated cache folder, a method's full arguments, and one tiny trained model for the session.

``make test-fast`` runs ``pytest -m "not slow"``: a test is marked ``slow`` (on itself, or a module's
``pytestmark`` when every test there is) when it trains, runs a pipeline or starts a subprocess that imports
the heavy stack; those run in ``make test`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache as memo
from pathlib import Path
from typing import Any

import pytest
from tiny_world import train_overrides, write_pattern_folder

from potion.config.compose import compose_config, method_arguments


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$POTION_CACHE_DIR in this test's own folder (decoded data sets, importances, logits)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("POTION_CACHE_DIR", str(folder))
    return folder


@memo
def _method_block(name: str) -> dict[str, Any]:
    return method_arguments(compose_config("unlearn", ["train_run=x", f"method={name}"]).method)


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

    root: Path  # holds data/, run/, cache/ and mlflow.db
    run: Path  # the training run folder (read it, never write into it)
    uri: str  # the sqlite MLflow store the training run is logged to
    summary: dict[str, Any]

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyRun]:
    """The shared trained model (16 of 320 samples poisoned with a 3x3 patch; ~5 s on one core)."""
    from potion.pipelines.train import run_training

    root = tmp_path_factory.mktemp("tiny_run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(root / "cache"))
        mp.setenv("POTION_THREADS", "1")
        data = write_pattern_folder(root / "data")
        uri = f"sqlite:///{root / 'mlflow.db'}"
        summary = run_training(compose_config("train", train_overrides(data, root / "run",
                                                                       f"logger.tracking_uri={uri}")))
        yield TinyRun(root, root / "run", uri, summary)


@pytest.fixture()
def tiny(tiny_run: TinyRun, monkeypatch: pytest.MonkeyPatch) -> TinyRun:
    """The shared trained model, with this test using its cache folder (its decoded data and importances)."""
    monkeypatch.setenv("POTION_CACHE_DIR", str(tiny_run.cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    return tiny_run
