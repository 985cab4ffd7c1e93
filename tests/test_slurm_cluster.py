"""The cluster path against a real SLURM controller: the PTN sweep through ``hydra/launcher=potion_slurm`` and an
``unlearn.py -m`` grid, both submitted with sbatch, tracked on an ``mlflow server`` on 127.0.0.1.

Needs a controller that answers: ``scripts/slurm_cluster.sh up`` starts a one-node cluster on this machine
(``.ci/run`` does it before ``make test``), and this module finds it through ``$SLURM_CONF`` or the script's
default folder. Without one every test here is skipped with the reason. The jobs run on this machine, so
the run folders and ``$POTION_CACHE_DIR`` (a temporary folder) are shared as on a cluster's shared
filesystem. About a minute on 2 cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from potion.config.compose import compose_config

pytestmark = pytest.mark.slow  # processes that import the heavy stack: make test only
ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["experiment=quickstart", "model=small_cnn", "model.width=32", "logger=none", "train.epochs=8"]
PTN = ["method=potion", "discovery.share=0.2", "method.ptn.s_start=0.01", "method.ptn.s_step=1.5",
       "method.ptn.max_steps=30"]
# potion_slurm asks for one GPU, 8 CPUs and 32 GB per job; the one-node test cluster has 2 CPUs and no GPU.
SLURM = ["hydra/launcher=potion_slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]
USABLE = ("idle", "mixed", "allocated", "completing")


def _slurm_env() -> dict[str, str]:
    """The environment as `eval "$(scripts/slurm_cluster.sh env)"` sets it, unless SLURM_CONF is already set."""
    env = dict(os.environ)
    folder = Path(env.get("POTION_SLURM_DIR", "/tmp/potion-slurm"))
    if "SLURM_CONF" not in env and (folder / "slurm.conf").is_file():
        env["SLURM_CONF"] = str(folder / "slurm.conf")
        env["PATH"] = f"{folder / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # its sacct, for submitit
    return env


def _node_states(env: dict[str, str]) -> list[str]:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    return proc.stdout.split()


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The environment that reaches a SLURM controller with a usable node; skip (with why) when none answers."""
    how = "start a one-node cluster with scripts/slurm_cluster.sh up"
    missing = [c for c in ("scontrol", "sbatch", "sinfo") if shutil.which(c) is None]
    if missing:
        pytest.skip(f"no SLURM client on PATH ({', '.join(missing)} missing): {how}")
    env = _slurm_env()
    try:
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.skip(f"no SLURM controller answers (scontrol ping timed out after 30 s): {how}")
    answer = (ping.stdout + ping.stderr).strip()
    if ping.returncode != 0 or " is UP" not in answer:
        last = answer.splitlines()[-1] if answer else f"exit code {ping.returncode}"
        pytest.skip(f"no SLURM controller answers (scontrol ping: {last}): {how}")
    deadline = time.monotonic() + 60
    while not any(s.startswith(USABLE) for s in _node_states(env)):
        if time.monotonic() > deadline:
            pytest.fail(f"the SLURM controller answers but no node is usable (sinfo: {_node_states(env)})")
        time.sleep(1)
    return env


@pytest.fixture(scope="module")
def work(cluster: dict[str, str], mlflow_server: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny poisoned digits model and the in-process PTN search on it (the answer the sweep must give)."""
    from potion.pipelines.train import run_training
    from potion.pipelines.unlearn import run_unlearning

    tmp = tmp_path_factory.mktemp("slurm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POTION_CACHE_DIR", str(tmp / "cache_local"))
        mp.setenv("POTION_THREADS", "1")
        run_training(compose_config("train", [*TRAIN, f"out_dir={tmp / 'train'}"]))
        inproc = run_unlearning(compose_config("unlearn", [f"train_run={tmp / 'train'}", *PTN, "logger=none",
                                                           f"out_dir={tmp / 'inproc'}", "save_weights=false"]))
    with open(tmp / "inproc" / "ptn_trajectory.csv") as fh:
        inproc["trajectory"] = {int(r["step"]): float(r["forget_acc"]) for r in csv.DictReader(fh)}
    inproc["chosen"] = int(inproc["ptn_steps"]) - 1
    if inproc["chosen"] < 2:
        pytest.fail(f"the in-process search stopped at k={inproc['chosen']}: the sweep would take one round")
    env = {**cluster, "POTION_CACHE_DIR": str(tmp / "cache_cluster"), "POTION_THREADS": "1"}
    return {"tmp": tmp, "inproc": inproc, "env": env, "uri": mlflow_server["uri"]}


def _run(work: dict[str, Any], script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / script), *args, f"train_run={work['tmp'] / 'train'}",
           f"logger.tracking_uri={work['uri']}", *SLURM]
    proc = subprocess.run(cmd, cwd=cwd, env=work["env"], capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _sbatch_scripts(sweep_dir: Path) -> list[str]:
    """The batch scripts submitit handed to sbatch (one per SLURM job array)."""
    return [p.read_text() for p in sorted((sweep_dir / ".submitit").glob("*/*_submission.sh"))]


def _runs(uri: str, experiment: str) -> list[Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} on {uri}"
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def sweep(work: dict[str, Any]) -> dict[str, Any]:
    """python sweep.py ... hydra/launcher=potion_slurm: a round of candidate steps per SLURM job."""
    tmp, batch = work["tmp"], work["inproc"]["chosen"] // 2 + 1  # two rounds, the answer in the second
    proc = _run(work, "sweep.py", *PTN, "logger.experiment=slurm_sweep", f"hydra.sweeper.batch_size={batch}",
                f"hydra.sweeper.steps_per_job={batch}", f"hydra.sweep.dir={tmp / 'sweep'}", f"out_dir={tmp / 'final'}")
    record = json.loads((tmp / "sweep" / "ptn_sweep.json").read_text())
    return {**record, "batch": batch, "stdout": proc.stdout,
            "final_summary": json.loads((tmp / "final" / "summary.json").read_text())}


def test_the_sweep_ran_its_jobs_through_sbatch(work: dict[str, Any], sweep: dict[str, Any]) -> None:
    scripts = _sbatch_scripts(work["tmp"] / "sweep")
    assert len(scripts) == sweep["ptn_rounds"] + 2  # prepare, one job per round, final
    assert all("#SBATCH --cpus-per-task=1" in s and "#SBATCH --mem=2GB" in s for s in scripts)
    assert all("--gpus-per-node" not in s for s in scripts)


def test_the_sweep_gives_the_in_process_answer(work: dict[str, Any], sweep: dict[str, Any]) -> None:
    inproc = work["inproc"]
    assert sweep["ptn_chosen_step"] == inproc["chosen"] and sweep["ptn_rounds"] == 2
    seen = {int(r["step"]): r["forget_acc"] for r in sweep["trajectory"]}
    measured = {step: acc for step, acc in inproc["trajectory"].items() if not math.isnan(acc)}
    assert max(measured) == inproc["chosen"]  # the decisive scan measures the step it stops on in full
    for step, forget_acc in measured.items():  # every step the in-process search measured in full, identically
        assert seen[step] == pytest.approx(forget_acc, abs=1e-12)
    final = sweep["final_summary"]
    assert final["ptn_steps"] == inproc["ptn_steps"]
    for key in ("clean_acc", "asr", "forget_acc", "healed"):
        assert final[key] == pytest.approx(inproc[key], abs=1e-9), key


def test_the_importances_were_computed_once(work: dict[str, Any], sweep: dict[str, Any]) -> None:
    cache = work["tmp"] / "cache_cluster" / "importance"
    assert len(list(cache.glob("*.safetensors"))) == 2  # Omega_r and Omega_f, written by the prepare job
    assert sweep["ptn_jobs_recomputed_importance"] == 0


def test_mlflow_holds_the_parent_and_its_children(work: dict[str, Any], sweep: dict[str, Any]) -> None:
    from potion.tracking.tracker import PARENT_TAG

    runs = _runs(work["uri"], "slurm_sweep")
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.tags["potion.launcher"] == "SlurmLauncher"
    assert parent.data.metrics["ptn_chosen_step"] == work["inproc"]["chosen"]
    assert parent.data.metrics["prepare_importance_cache_hit"] == 0
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags[PARENT_TAG] == parent.info.run_id for r in children)
    candidates = [r for r in children if r.data.tags.get("potion.task") == "ptn_candidate"]
    assert sorted(int(r.data.params["method.ptn.fixed_step"]) for r in candidates) == list(
        range(sweep["ptn_steps_evaluated"]))
    assert all(r.data.metrics["importance_cache_hit"] == 1 for r in candidates)
    finals = [r for r in children if r.data.tags.get("potion.task") == "unlearn"]
    assert [r.info.run_id for r in finals] == [parent.data.tags["potion.final_run_id"]]
    assert finals[0].data.metrics["healed"] == pytest.approx(sweep["final_summary"]["healed"])
    assert all(r.info.status == "FINISHED" for r in runs)


def test_a_failed_job_is_reported_not_awaited(cluster: dict[str, str], tmp_path: Path) -> None:
    """A job that exits with an error writes no result: the launcher learns from sacct that it failed."""
    cmd = [sys.executable, str(ROOT / "unlearn.py"), "-m", f"train_run={tmp_path / 'missing'}", "logger=none",
           *SLURM, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**cluster, "POTION_CACHE_DIR": str(tmp_path / "cache")},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "FAILED" in proc.stderr and "no such run folder" in proc.stderr  # the job's own error line, passed on


def test_an_unlearning_grid_runs_through_slurm(work: dict[str, Any]) -> None:
    """unlearn.py -m over two methods: two SLURM jobs that log to the server themselves; read back from MLflow."""
    tmp = work["tmp"]
    cwd = tmp / "grid_cwd"  # each cell's run folder is runs/unlearn/<method>-<hash> under the working directory
    cwd.mkdir()
    _run(work, "unlearn.py", "-m", *PTN[1:], "method=potion,lfssd", "logger.experiment=slurm_grid",
         "save_weights=false", f"hydra.sweep.dir={tmp / 'grid'}", cwd=cwd)
    assert len(_sbatch_scripts(tmp / "grid")) == 1  # one job array of two tasks
    summaries = {s["method"]: s for s in (json.loads(p.read_text())
                                          for p in (cwd / "runs" / "unlearn").glob("*/summary.json"))}
    assert set(summaries) == {"potion", "lfssd"}
    runs = {r.info.run_id: r for r in _runs(work["uri"], "slurm_grid")}
    assert sorted(runs) == sorted(s["mlflow_run_id"] for s in summaries.values())
    for s in summaries.values():
        run = runs[s["mlflow_run_id"]]
        assert run.info.status == "FINISHED"
        for key in ("healed", "acc_drop", "clean_acc"):
            assert run.data.metrics[key] == pytest.approx(s[key]), key
    inproc = work["inproc"]  # the potion cell is the in-process run's configuration
    for key in ("healed", "clean_acc", "ptn_steps"):
        assert summaries["potion"][key] == pytest.approx(inproc[key], abs=1e-9), key
