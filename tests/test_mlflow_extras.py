"""What an MLflow user expects of every run (potion.tracking.extras): the git commit, the data set as a dataset
input, the weights as a logged model of safetensors files that loads back, config.yaml and run.log artifacts,
optional system metrics, and the run's address in the UI printed by the command."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from tiny_world import QUICK_PTN, OwnModel, free_port, heal_overrides

from potion.config.compose import compose_config
from potion.core.run_log import captured_log
from potion.tracking.extras import DIGEST_CHARS, ui_lines
from potion.tracking.tracker import MlflowTracker, RecordingTracker, start_tracker
from potion.tracking.uris import logger_settings

# --------------------------------------------------------------------------- settings, records, the log, the UI


def test_system_metrics_settings() -> None:
    base = {"name": "mlflow", "tracking_uri": "sqlite:///x.db"}
    off = logger_settings(base)
    assert off is not None and off.system_metrics is False and off.system_metrics_interval_s == 10.0
    on = logger_settings({**base, "system_metrics": True, "system_metrics_interval_s": 0.5})
    assert on is not None and on.system_metrics is True and on.system_metrics_interval_s == 0.5
    assert compose_config("train", ["logger.system_metrics=true"]).logger.system_metrics is True


def test_recorded_inputs_models_and_texts_survive_json(tmp_path: Path) -> None:
    rec = RecordingTracker("r")
    rec.log_inputs({"name": "d", "digest": "ab", "source_type": "code", "source": "{}", "profile": {"n": 1}},
                   "unlearning", "train-run")
    rec.log_model("m", {"model.safetensors": "w.safetensors"}, {"architecture": "small_cnn", "kwargs": {"width": 8}})
    rec.log_text("hello", "run.log")
    calls = json.loads(json.dumps(rec.calls))  # what mlflow_pending.json keeps
    into = RecordingTracker("s")
    RecordingTracker.replay(calls, into)
    assert [c[0] for c in into.calls] == ["inputs", "model", "text"]
    assert into.calls[0][1]["source_run_id"] == "train-run" and into.calls[0][1]["dataset"]["profile"] == {"n": 1}
    assert into.calls[1][1]["files"]["model.safetensors"] == str(Path("w.safetensors").absolute())


def test_the_run_log_holds_log_records_and_console_writes_and_keeps_the_end() -> None:
    import sys

    logger = logging.getLogger("potion.test_capture")
    logger.setLevel(logging.INFO)
    with captured_log(limit_chars=400) as run_log:
        logger.info("a record")
        print("a printed line")
        sys.stderr.write("bar 10%\rbar 50%\rbar 100%\n")
        sys.stderr.write("unfinished\rredrawn")
        text = run_log.text()
        for i in range(200):
            print(f"line {i}")
    assert "INFO potion.test_capture: a record" in text and "a printed line\n" in text
    assert "bar 100%\n" in text and "bar 10%" not in text and text.endswith("redrawn\n")
    end = run_log.text()
    assert "line 199" in end and "line 0\n" not in end and end.startswith("[") and len(end) < 500
    assert type(sys.stdout).__name__ != "_Tee" and type(sys.stderr).__name__ != "_Tee"


def test_ui_lines_for_a_server_a_sqlite_store_and_others() -> None:
    http = ui_lines("http://h:5000/", "3", "abc")
    assert http == ["MLflow run: http://h:5000/#/experiments/3/runs/abc?workflowType=machine_learning",
                    "MLflow runs table: http://h:5000/#/experiments/3/runs?workflowType=machine_learning"]
    local = ui_lines("sqlite:////w/mlflow.db", "3", "abc")
    assert local[0] == "MLflow run: http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert "mlflow ui --backend-store-uri sqlite:////w/mlflow.db" in local[2]
    assert ui_lines("databricks", "3", "abc") == [] and ui_lines("http://h", None, "abc") == []
    assert ui_lines("http://h", "3", "abc", "final run", table=False) == [
        "MLflow final run: http://h/#/experiments/3/runs/abc?workflowType=machine_learning"]


# --------------------------------------------------------------------------- runs in a store (slow)


def _artifacts(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


def _model_output(client, run_id: str) -> str:
    outputs = client.get_run(run_id).outputs.model_outputs
    assert len(outputs) == 1
    return outputs[0].model_id


def _same_weights(folder: Path, weights: Path) -> None:
    import torch

    from potion.core.io import load_tensors
    from potion.tracking.logged_model import load_logged_model

    with open(folder / "model.safetensors", "rb") as fh:  # a safetensors header (a JSON length, then JSON)
        size = int.from_bytes(fh.read(8), "little")
        assert json.loads(fh.read(size))
    model, spec = load_logged_model(folder)
    want = load_tensors(weights)
    got = model.state_dict()
    prefix = spec["key_prefix"]
    assert set(got) == {k[len(prefix):] for k in want}
    assert all(torch.equal(got[k[len(prefix):]], v) for k, v in want.items())


@pytest.mark.slow
def test_the_training_run_has_its_dataset_git_commit_config_log_and_logged_model(tiny, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from potion.data.poisoned import load_data
    from potion.pipelines.run_folders import load_trained_run
    from potion.tracking.logged_model import download_logged_model, logged_model_id

    client = MlflowClient(tracking_uri=tiny.uri)
    run_id = tiny.summary["mlflow_run_id"]
    run = client.get_run(run_id)
    cfg = load_trained_run(tiny.run).cfg
    fingerprint = load_data(cfg.dataset).fingerprint  # the data cache's key: reused, not hashed again
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == fingerprint[:DIGEST_CHARS] and inp.dataset.name == "imagefolder"
    assert json.loads(inp.dataset.source)["uri"] == str(tiny.data.absolute())
    assert json.loads(inp.dataset.profile)["fingerprint"] == fingerprint
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert {"config.yaml", "run.log", "model.safetensors"} <= _artifacts(client, run_id)

    model_id = logged_model_id(tiny.uri, run_id)
    assert model_id == _model_output(client, run_id)
    model = client.get_logged_model(model_id)
    assert model.status.to_int() == 1 or str(model.status).endswith("READY")
    folder = download_logged_model(tiny.uri, model_id, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.yaml", "model.json", "model.safetensors"]
    _same_weights(folder, tiny.run / "model.safetensors")


@pytest.mark.slow
def test_an_unlearning_run_links_the_training_model_logs_its_log_config_and_system_metrics(
        tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    from potion.pipelines.unlearn import run_unlearning
    from potion.tracking.logged_model import download_logged_model

    caplog.set_level(logging.INFO)  # the console level a command runs with (Hydra's job logging)
    out = tmp_path / "u"
    summary = run_unlearning(compose_config("unlearn", [
        f"train_run={tiny.run}", *QUICK_PTN, "method.synthesis.enabled=true",  # synthesis writes log lines
        f"logger.tracking_uri={tiny.uri}", f"out_dir={out}", "logger.system_metrics=true",
        "logger.system_metrics_interval_s=0.2", "reference=off"]))
    client = MlflowClient(tracking_uri=tiny.uri)
    run = client.get_run(summary["mlflow_run_id"])
    train = client.get_run(tiny.summary["mlflow_run_id"])
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == train.inputs.dataset_inputs[0].dataset.digest
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "unlearning"
    assert [m.model_id for m in run.inputs.model_inputs] == [_model_output(client, train.info.run_id)]
    assert {"config.yaml", "run.log", "model.safetensors"} <= _artifacts(client, run.info.run_id)
    assert "train_run" in (out / "config.yaml").read_text() and (out / "run.log").read_text().strip()
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    folder = download_logged_model(tiny.uri, _model_output(client, run.info.run_id), tmp_path / "m")
    _same_weights(folder, out / "model.safetensors")
    printed = capsys.readouterr().out
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in printed
    assert f"mlflow ui --backend-store-uri {tiny.uri}" in printed


@pytest.mark.slow
def test_a_server_run_prints_its_address_and_serves_its_logged_model(mlflow_server: dict, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from potion.core.io import save_tensors
    from potion.models import build_model
    from potion.tracking.logged_model import download_logged_model, load_logged_model, logged_model_id

    net = build_model("small_cnn", 4, 3, width=4)
    weights = save_tensors(tmp_path / "model.safetensors", net.state_dict())
    cfg = {"name": "mlflow", "tracking_uri": mlflow_server["uri"], "experiment": "extras", "timeout_s": 10}
    with start_tracker(cfg, experiment="x", run_name="r") as tracker:
        tracker.log_model("r", {"model.safetensors": str(weights)},
                          {"format": "potion-model/1", "architecture": "small_cnn", "kwargs": {"width": 4},
                           "num_classes": 4, "channels": 3, "key_prefix": "", "weights": "model.safetensors"})
    printed = capsys.readouterr().out
    assert (f"MLflow run: {mlflow_server['uri']}/#/experiments/{tracker.experiment_id}/runs/{tracker.run_id}"
            "?workflowType=machine_learning") in printed
    assert f"{mlflow_server['uri']}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning" in printed
    uri = mlflow_server["uri"]
    folder = download_logged_model(uri, logged_model_id(uri, str(tracker.run_id)), tmp_path / "d")
    model, _ = load_logged_model(folder)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in net.state_dict().items())


@pytest.mark.slow
def test_a_dead_server_fails_the_new_calls_quickly_and_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from mlflow import MlflowClient

    from potion.tracking.uris import apply_timeout

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for key in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
        monkeypatch.delenv(key, raising=False)
    apply_timeout(2)
    uri = f"http://127.0.0.1:{free_port()}"
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    tracker = MlflowTracker(MlflowClient(tracking_uri=uri), "0" * 32, uri, "1")
    started = time.monotonic()
    tracker.log_inputs({"name": "d", "digest": "ab", "source_type": "code", "source": "{}"}, "training", "x")
    tracker.log_model("m", {"model.safetensors": str(weights)}, {"architecture": "a", "kwargs": {}, "num_classes": 2,
                                                                "channels": 1, "format": "potion-model/1"})
    tracker.start_system_metrics(0.1)
    tracker.finish("FINISHED")
    assert time.monotonic() - started < 30
    assert tracker.offline and "stopped answering" in caplog.text


@pytest.mark.slow
def test_heal_logs_its_pt_output_as_a_safetensors_logged_model(own_model: OwnModel, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    from potion.pipelines.heal import heal
    from potion.tracking.logged_model import download_logged_model

    monkeypatch.setenv("POTION_CACHE_DIR", str(own_model.cache))
    monkeypatch.setenv("POTION_THREADS", "1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    s = heal(compose_config("heal", [*heal_overrides(own_model, f"out_dir={out}", "method=ssd"), "logger=mlflow",
                                     f"logger.tracking_uri={uri}"]))
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(s["mlflow_run_id"])
    (inp,) = run.inputs.dataset_inputs
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "unlearning"
    assert {"config.yaml", "run.log", "healed.pt"} <= _artifacts(client, run.info.run_id)
    folder = download_logged_model(uri, _model_output(client, run.info.run_id), tmp_path / "m")
    assert not any(p.suffix == ".pt" for p in folder.iterdir())  # the pickle-format file is converted
    _same_weights(folder, out / "healed.pt")
    assert f"#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in capsys.readouterr().out
