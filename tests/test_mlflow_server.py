"""A real tracking server (the session's ``mlflow_server``, tests/conftest.py): a tiny train, an unlearning run and a
PTN sweep log to it over HTTP, and everything is read back through the client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_world import QUICK_PTN, train_overrides, write_pattern_folder

pytestmark = pytest.mark.slow  # a server process, a trained model, a sweep

ROOT = Path(__file__).resolve().parent.parent
PTN = QUICK_PTN


@pytest.fixture(scope="module")
def logged(mlflow_server: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train, unlearn and PTN-sweep a tiny poisoned model, all logging to the server (the training is this module's
    own: its point is a training run logged over HTTP, with its weights as an artifact)."""
    from potion.config.compose import compose_config
    from potion.pipelines.train import run_training
    from potion.pipelines.unlearn import run_unlearning

    root, uri = tmp_path_factory.mktemp("logged"), mlflow_server["uri"]
    env = {**os.environ, "POTION_CACHE_DIR": str(root / "cache"), "POTION_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k in ("POTION_CACHE_DIR", "POTION_THREADS"):
            mp.setenv(k, env[k])
        data = write_pattern_folder(root / "data")
        trained = run_training(compose_config("train", train_overrides(data, root / "run",
                                                                       f"logger.tracking_uri={uri}")))
        healed = run_unlearning(compose_config("unlearn", [f"train_run={root / 'run'}", *PTN,
                                                           f"logger.tracking_uri={uri}", f"out_dir={root / 'u'}"]))
    cmd = [sys.executable, "sweep.py", f"train_run={root / 'run'}", *PTN, f"logger.tracking_uri={uri}",
           "logger.experiment=sweep", "hydra.sweeper.batch_size=8", f"hydra.sweep.dir={root / 'sweep'}",
           f"out_dir={root / 'final'}"]  # jobs never reach the store (the sweeper logs): the basic launcher is enough
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"sweep.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return {"trained": trained, "healed": healed, "uri": uri, "root": root}


def test_training_and_unlearning_runs_are_on_the_server(logged: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=logged["uri"])
    train_run = client.get_run(logged["trained"]["mlflow_run_id"])
    assert train_run.info.status == "FINISHED"
    for key in ("clean_acc", "poison_acc", "asr"):
        assert train_run.data.metrics[key] == pytest.approx(logged["trained"][key])
    assert "model.safetensors" in {a.path for a in client.list_artifacts(train_run.info.run_id)}  # over HTTP
    unlearn_run = client.get_run(logged["healed"]["mlflow_run_id"])
    assert unlearn_run.data.tags["potion.train_run_id"] == train_run.info.run_id
    assert unlearn_run.data.metrics["healed"] == pytest.approx(logged["healed"]["healed"])


def test_the_sweep_links_children_to_its_parent_on_the_server(logged: dict) -> None:
    from mlflow import MlflowClient

    from potion.tracking.tracker import PARENT_TAG

    client = MlflowClient(tracking_uri=logged["uri"])
    exp = client.get_experiment_by_name("sweep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1 and parents[0].data.tags["potion.task"] == "ptn_sweep"
    pid = parents[0].info.run_id
    children = [r for r in runs if r.info.run_id != pid]
    assert children and all(r.data.tags[PARENT_TAG] == pid for r in children)
    chosen = parents[0].data.metrics["ptn_chosen_step"]
    assert chosen == logged["healed"]["ptn_steps"] - 1  # the sweep's answer = the in-process search's
    assert parents[0].data.tags["potion.launcher"] == "BasicLauncher"
    final = next(r for r in children if r.data.tags.get("potion.task") == "unlearn")
    assert final.info.run_id == parents[0].data.tags["potion.final_run_id"] and final.info.status == "FINISHED"
    assert final.data.metrics["healed"] == pytest.approx(parents[0].data.metrics["healed"])
    assert "summary.json" in {a.path for a in client.list_artifacts(final.info.run_id)}  # replayed over HTTP
