"""train.py / unlearn.py interrupted between summary.json and their MLflow logging: the rerun reuses the
finished folder and logs it, so the run reaches the store and potion.report (before, it said "already
finished; reused", logged nothing, and the report found no finished runs)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import TinyRun
from tiny_world import train_overrides

from potion.config.compose import compose_config
from potion.core.errors import TrackingError
from potion.core.io import read_json
from potion.tracking.tracker import MlflowTracker

PTN = ["method=potion", "discovery.share=0.5"]


def _interrupt_after_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C arrives while the finished run's metrics are being logged (summary.json is on disk)."""
    real = MlflowTracker.log_metrics

    def log_metrics(self: MlflowTracker, metrics: Any, step: int | None = None) -> None:
        if step is None:
            raise KeyboardInterrupt
        real(self, metrics, step)

    monkeypatch.setattr(MlflowTracker, "log_metrics", log_metrics)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.mark.slow  # pipeline runs on the session's trained model
def test_an_interrupted_training_run_is_logged_when_reused(tiny: TinyRun, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines.train import run_training

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "run"
    shutil.copytree(tiny.run, run_dir)  # the finished folder, as if trained here
    (run_dir / "summary.json").write_text((tiny.run / "summary.json").read_text().replace(
        tiny.summary["mlflow_run_id"], "0" * 32))  # its run is not in this store
    cfg = compose_config("train", train_overrides(tiny.data, run_dir, f"logger.tracking_uri={uri}"))
    summary = run_training(cfg)
    assert summary["reused"] and summary["mlflow_run_id"] != "0" * 32
    run = _client(uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["clean_acc"] == pytest.approx(summary["clean_acc"])
    assert run.data.tags["potion.task"] == "train" and run.data.params["poison.count"] == "16"
    assert read_json(run_dir / "summary.json")["mlflow_run_id"] == summary["mlflow_run_id"]
    assert run_training(cfg)["mlflow_run_id"] == summary["mlflow_run_id"]  # logged once


@pytest.mark.slow  # pipeline runs on the session's trained model
def test_an_interrupted_unlearning_run_is_logged_when_reused_and_reaches_the_report(
        tiny: TinyRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from potion.pipelines.unlearn import run_unlearning
    from potion.report import collect_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = compose_config("unlearn", [f"train_run={tiny.run}", *PTN, f"logger.tracking_uri={uri}",
                                     f"out_dir={tmp_path / 'u'}", "save_weights=false"])
    with monkeypatch.context() as mp:
        _interrupt_after_summary(mp)
        with pytest.raises(KeyboardInterrupt):
            run_unlearning(cfg)
    first = read_json(tmp_path / "u" / "summary.json")
    client = _client(uri)
    assert client.get_run(first["mlflow_run_id"]).info.status == "KILLED"
    experiment = client.get_experiment_by_name("imagefolder-small_cnn").experiment_id  # the training run's study
    assert collect_runs(client, [experiment]) == []  # what the report saw before

    again = run_unlearning(cfg)
    assert again["reused"] and again["mlflow_run_id"] != first["mlflow_run_id"]
    rows = collect_runs(client, [experiment])
    assert [r["run_id"] for r in rows] == [again["mlflow_run_id"]]
    assert rows[0]["healed"] == pytest.approx(first["healed"]) and rows[0]["n_f"] == first["n_f"]
    run = client.get_run(again["mlflow_run_id"])
    assert "ptn_traj_forget_acc" in run.data.metrics and "suspects.csv" in {a.path for a in
                                                                            client.list_artifacts(run.info.run_id)}


@pytest.mark.slow  # pipeline runs on the session's trained model
def test_a_reused_unlearning_run_checks_its_tracking_uri(tiny: TinyRun, tmp_path: Path) -> None:
    from potion.pipelines.unlearn import run_unlearning

    out = [f"train_run={tiny.run}", *PTN, f"out_dir={tmp_path / 'u'}", "save_weights=false"]
    run_unlearning(compose_config("unlearn", [*out, "logger=none"]))
    with pytest.raises(TrackingError, match="file store"):
        run_unlearning(compose_config("unlearn", [*out, "logger.tracking_uri=file:///tmp/mlruns"]))
