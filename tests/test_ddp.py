"""trainer=ddp end to end on CPU: two processes (gloo) train the tiny model's recipe together (two epochs of the
session's pattern folder, tests/conftest.py); rank 0 alone writes the run folder and the one MLflow run, the saved
weights are the ones its summary describes, and the same command then finds the finished run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_world import train_overrides

pytestmark = pytest.mark.slow  # processes that import the heavy stack: make test only
ROOT = Path(__file__).resolve().parent.parent
DDP_CPU = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.channels_last=false"]


def _train(tmp: Path, data: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *train_overrides(data, tmp / "run", *DDP_CPU, "train.epochs=2",
                                                        f"logger.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                                                        f"hydra.run.dir={tmp / 'hydra'}")]
    env = {**os.environ, "POTION_CACHE_DIR": str(tmp / "cache"), "POTION_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory, tiny_data: Path) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    proc = _train(tmp, tiny_data)
    return {"tmp": tmp, "data": tiny_data, "stdout": proc.stdout,
            "summary": json.loads((tmp / "run" / "summary.json").read_text())}


def test_two_processes_share_the_epochs(ddp_run: dict) -> None:
    s = ddp_run["summary"]
    # Each rank reads half of every epoch, so the optimizer takes half the steps of one process: the schedule's
    # step count was computed for a world of 2 and matches what each rank's loader delivered.
    assert s["epochs"] == pytest.approx(2.0)
    assert (ddp_run["tmp"] / "run" / "checkpoints" / "last.ckpt").is_file()
    assert ddp_run["stdout"].count("run folder:") == 1  # rank 1 trains, rank 0 reports


def test_rank_zero_alone_tracks_the_run(ddp_run: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{ddp_run['tmp'] / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.run_id for r in runs] == [ddp_run["summary"]["mlflow_run_id"]]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["clean_acc"] == pytest.approx(ddp_run["summary"]["clean_acc"])


def test_the_saved_weights_are_the_summarised_model(ddp_run: dict) -> None:
    import torch

    from potion.data.poisoned import load_data, poison
    from potion.evaluation.backdoor import evaluate_backdoor
    from potion.pipelines.run_folders import load_trained_run
    from potion.pipelines.unlearn import model_before_copy

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(ddp_run["tmp"] / "cache"))
        run = load_trained_run(ddp_run["tmp"] / "run")
        bundle = load_data(run.cfg.dataset)
        data = poison(bundle, run.plan)
    model = model_before_copy(run, data, torch.device("cpu"))
    got = evaluate_backdoor(model, bundle.test.images, bundle.test.labels, data.normalizer, data.trigger,
                            data.wanted_test_labels())
    for key in ("clean_acc", "poison_acc", "asr"):
        assert got[key] == pytest.approx(ddp_run["summary"][key], abs=1e-9), key


def test_the_same_command_reuses_the_finished_run(ddp_run: dict) -> None:
    again = _train(ddp_run["tmp"], ddp_run["data"])
    assert "(already finished; reused)" in again.stdout
    assert json.loads((ddp_run["tmp"] / "run" / "summary.json").read_text()) == ddp_run["summary"]
